"""What the pipeline reports while it runs (`Progress`) and what a train or a change returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.catalog.ingest import Skipped
from service.storage.manifest import Manifest


@dataclass(frozen=True)
class Progress:
    stage: str  # "ingest", "convert", "embed", "fine-tune", "index", "fuse", "publish"
    done: int
    total: int


ProgressFn = Callable[[Progress], None]


def quiet(progress: Progress) -> None:
    """The progress callback of a caller that does not listen."""


@dataclass
class TrainResult:
    version: str
    count: int
    counts: dict[str, Any]
    skipped: list[Skipped] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)  # hold-out metrics when fine-tuned
    runtime: dict[str, Any] = field(default_factory=dict)  # which runtime serves it, and why


@dataclass
class ChangeResult:
    version: str
    kind: str  # "add", "delete", "edit"
    items: list[int]  # the ids the change added, replaced, deleted or edited
    count: int  # items in the new version
    counts: dict[str, Any] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)
    rebases: int = 0
    runtime: dict[str, Any] = field(default_factory=dict)  # which runtime serves it, and why
    manifest: Manifest | None = None  # the version published (None when the change published none)
