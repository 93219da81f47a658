"""Duplicate reports as use cases: run one over the served version (a job's work), read one back
for a client (tied to its version, with image URLs), and the report as CSV."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.core.errors import InvalidParameterError
from service.serving import duplicate_records, duplicate_report
from service.serving.registry import LoadedVersion
from service.storage import Storage
from service.training.results import Progress, ProgressFn

# (item id, which of its photos, version) -> the image's URL
ImageUrl = Any


def check_threshold(threshold: float) -> float:
    if not 0 < threshold <= 1:
        raise InvalidParameterError(
            f"threshold must be in (0, 1], got {threshold}",
            errors={"threshold": ["Must be greater than 0 and at most 1."]},
        )
    return float(threshold)


def run(
    loaded: LoadedVersion, storage: Storage, threshold: float, folder: Path, progress: ProgressFn
) -> dict[str, Any]:
    """The served version's report (its groups, the marks "not duplicates" left out)."""
    started = datetime.now(UTC)

    def report(stage: str, done: int, total: int) -> None:
        progress(Progress(stage, done, total))

    groups = duplicate_report.report(
        loaded.view,
        loaded.manifest.head is not None,
        threshold,
        folder,
        duplicate_records.ignored(storage, loaded.endpoint),
        report,
    )
    return {
        "endpoint": loaded.endpoint,
        "version": loaded.version,
        "threshold": threshold,
        "created_at": started.isoformat(timespec="seconds"),
        "counts": {
            "items": loaded.count,
            "groups": len(groups),
            "duplicates": sum(len(g["items"]) - 1 for g in groups),
            "exact_groups": sum(1 for g in groups if g["exact"]),
        },
        "groups": groups,
    }


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
