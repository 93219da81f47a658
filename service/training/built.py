"""What a change builds on a base version (`Built`), and what a change is (`Change`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from service.storage.manifest import Manifest
from service.training.base import Base
from service.training.results import ChangeResult
from service.training.stage import Stager


@dataclass
class Built:
    """A change built on a base: the new version's manifest, the base's blobs it keeps (not
    uploaded again), and what it reports."""

    manifest: Manifest
    known: set[str]
    result: ChangeResult


class Change(Protocol):
    def build(self, base: Base | None, stager: Stager, version: str) -> Built: ...
