"""Duplicate reports as use cases: run one over the current version (a job's work), read one back
for a client (tied to its version, with image URLs), and the report as CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.catalog.view import View
from service.core.config import Settings
from service.core.endpoint import EndpointSpec
from service.core.errors import InvalidParameterError, TrainingError
from service.serving import duplicate_records, duplicate_report
from service.storage import Storage, open_storage
from service.storage.blobs import BlobCache
from service.storage.manifest import Manifest
from service.training import steps
from service.training.base import read_base
from service.training.results import Progress, ProgressFn

# (item id, which of its photos, version) -> the image's URL
ImageUrl = Callable[[int, int, str], str]


def check_threshold(threshold: float) -> float:
    """A report's threshold, in (0, 1] (422 otherwise)."""
    if not 0 < threshold <= 1:
        raise InvalidParameterError(
            f"threshold must be in (0, 1], got {threshold}",
            errors={"threshold": ["Must be greater than 0 and at most 1."]},
        )
    return float(threshold)


def run(
    view: View, manifest: Manifest, storage: Storage, threshold: float, folder: Path, progress: ProgressFn
) -> dict[str, Any]:
    """A version's report (its groups, the marks "not duplicates" left out)."""
    started = datetime.now(UTC)

    def report(stage: str, done: int, total: int) -> None:
        progress(Progress(stage, done, total))

    groups = duplicate_report.report(
        view,
        manifest.head is not None,
        threshold,
        folder,
        duplicate_records.ignored(storage, manifest.endpoint),
        report,
    )
    return {
        "endpoint": manifest.endpoint,
        "version": manifest.version,
        "threshold": threshold,
        "created_at": started.isoformat(timespec="seconds"),
        "counts": {
            "items": manifest.count,
            "groups": len(groups),
            "duplicates": sum(len(g["items"]) - 1 for g in groups),
            "exact_groups": sum(1 for g in groups if g["exact"]),
        },
        "groups": groups,
    }


def run_job(
    settings: Settings, spec: EndpointSpec, job_id: str, threshold: float, progress: ProgressFn
) -> dict[str, Any]:
    """A report job's work, in whichever process runs it (a job child on a web or worker
    instance): the version CURRENT names now, read from the store (no encoder: a report embeds
    nothing), its report stored beside the job; returns the job's outcome."""
    storage = open_storage(
        settings.storage_uri, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
    )
    base = read_base(storage, spec.name, BlobCache(storage, settings.cache_dir), spec.search_k)
    if base is None:
        raise TrainingError(f"{spec.name} has no trained version to report on")
    with steps.work_folder(settings, spec.name, "duplicates") as tmp:
        report = run(base.view, base.manifest, storage, threshold, Path(tmp), progress)
    duplicate_records.save_report(storage, job_id, report)
    return {"status": "succeeded", "version": base.version, "counts": report["counts"]}


def for_client(report: dict[str, Any], current: str | None, image_url: ImageUrl) -> dict[str, Any]:
    """A stored report with each item's image URL (in the report's version) and whether the
    catalogue has changed since."""
    version = report["version"]
    for group in report["groups"]:
        for item in group["items"]:
            item["image_url"] = image_url(item["id"], item.get("photo", 0), version)
    return {**report, "current_version": current, "stale": current != version}


def to_csv(report: dict[str, Any]) -> str:
    """One row per item of each group: group number, whether it is the keeper, and the item."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["group", "keeper", "exact", "id", "name", "label", "score", "metadata", "image_url"])
    for n, group in enumerate(report["groups"], 1):
        for i, item in enumerate(group["items"]):
            writer.writerow(
                [
                    n,
                    "yes" if i == 0 else "no",
                    "yes" if group["exact"] else "no",
                    item["id"],
                    _cell(item["name"]),
                    _cell(item.get("label") or ""),
                    item["score"],
                    _cell(json.dumps(item.get("metadata") or {}, sort_keys=True)),
                    item.get("image_url", ""),
                ]
            )
    return out.getvalue()


def _cell(value: str) -> str:
    """A value a spreadsheet will not run as a formula (CSV injection)."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value
