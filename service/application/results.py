"""What `Service` methods return: plain dataclasses, shaped like the API's answers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.jobs.runner import Job

__all__ = ["Job"]  # a job's status, as `Service` returns it

Match = dict[str, Any]  # one result: id, name, score, label, metadata, image_url (photo)


@dataclass(frozen=True)
class Health:
    status: str = "ok"
    worker: int | None = None  # the answering process; None for callers who may not see it
    endpoints: dict[str, str | None] | None = None  # the version each endpoint serves here
    # Why an endpoint's current version is not served here (a blob that failed its check, a
    # full cache, a store out of reach), by endpoint; only endpoints with a problem.
    problems: dict[str, str] | None = None


@dataclass(frozen=True)
class SearchArgs:
    """A query's validated arguments: how many results, and the filter (None: none)."""

    k: int
    filter: Any = None
    duplicates: Any = None  # serving.query.Duplicates: mark (or keep only) duplicates of the query


@dataclass(frozen=True)
class SearchResult:
    endpoint: str
    version: str
    results: list[list[Match]]  # per query image, best first
    id: int | None = None  # the item a `similar` search started from


@dataclass(frozen=True)
class ImageSource:
    """Where an image's bytes are: a local file, a URL to redirect to, or the bytes themselves."""

    mimetype: str
    path: Path | None = None
    url: str | None = None
    data: bytes | None = None
    versioned: bool = False  # the request named its version: the bytes never change


@dataclass(frozen=True)
class UploadTicket:
    upload_url: str
    method: str
    source: str
    expires_in: int


@dataclass(frozen=True)
class ChangeOutcome:
    endpoint: str
    version: str
    kind: str
    items: list[int]
    count: int
    published: bool = True  # False: nothing to change (a migrate of a migrated endpoint)


@dataclass(frozen=True)
class VersionInfo:
    version: str
    count: int | None
    current: bool
    created_at: str | None
    fine_tuned: bool
    change: str  # what made it: train, add, delete, edit, compact, migrate
    segments: int


@dataclass(frozen=True)
class VersionList:
    endpoint: str
    current: str | None
    versions: list[VersionInfo] = field(default_factory=list)


@dataclass(frozen=True)
class WorkerOutcome:
    job_id: str
    status: str
    error: str | None
    finished: bool  # False: this attempt failed in a way worth another (the queue redelivers)
