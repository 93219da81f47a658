"""Where duplicate reports and "not duplicates" marks are kept in the store: a report beside its
job's record (`jobs/<id>/report.json`, written once by the job), the marks per endpoint
(`<endpoint>/duplicates/ignored.json`, changed by compare-and-swap so two people marking at once
both count)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from service.catalog.duplicates import Ignored
from service.core.errors import ConflictError, InvalidParameterError, ItemNotFoundError
from service.storage import KeyNotFoundError, Storage

# Marks kept per endpoint, and items per mark (a person marks one report group at a time): at most
# 200,000 ids in all, a file of about 1.5 MB read by every report.
MAX_MARKS = 2_000
MAX_MARK_ITEMS = 100


def report_key(job_id: str) -> str:
    return f"jobs/{job_id}/report.json"


def save_report(storage: Storage, job_id: str, report: dict[str, Any]) -> None:
    storage.write(report_key(job_id), json.dumps(report).encode())


def load_report(storage: Storage, job_id: str) -> dict[str, Any]:
    return dict(json.loads(storage.read(report_key(job_id))))


def ignored_key(endpoint: str) -> str:
    return f"{endpoint}/duplicates/ignored.json"


def read_marks(storage: Storage, endpoint: str) -> list[list[int]]:
    try:
        return [list(map(int, group)) for group in json.loads(storage.read(ignored_key(endpoint)))]
    except KeyNotFoundError:
        return []


def ignored(storage: Storage, endpoint: str) -> Ignored:
    return Ignored(read_marks(storage, endpoint))


def check_group(items: list[int]) -> list[int]:
    """The distinct ids of a mark (2 to MAX_MARK_ITEMS of them; 422 otherwise)."""
    group = sorted(set(items))
    if not 2 <= len(group) <= MAX_MARK_ITEMS:
        raise InvalidParameterError(
            f"name between 2 and {MAX_MARK_ITEMS} distinct items, got {len(group)}",
            errors={"ids": ["Name 2 or more distinct items."]},
        )
    return group


def _change(storage: Storage, endpoint: str, change: Callable[[list[list[int]]], bool]) -> list[list[int]]:
    """Apply `change` to the endpoint's marks (False: nothing to write) by compare-and-swap."""
    key = ignored_key(endpoint)
    for _ in range(10):
        try:
            data, tag = storage.read_tagged(key)
            marks = [list(map(int, g)) for g in json.loads(data)]
        except KeyNotFoundError:
            marks, tag = [], None
        if not change(marks):
            return marks
        if storage.write_if(key, json.dumps(marks).encode(), tag):
            return marks
    raise ConflictError(f"{endpoint}: the marks kept changing; try again")


def mark_not_duplicates(storage: Storage, endpoint: str, items: list[int]) -> list[list[int]]:
    """Remember that these items (checked to exist by the caller) are not duplicates of each
    other; returns every mark."""
    group = check_group(items)

    def add(marks: list[list[int]]) -> bool:
        if group in marks:
            return False
        if len(marks) >= MAX_MARKS:
            raise ConflictError(
                f"{endpoint} has {MAX_MARKS} 'not duplicates' marks already; remove some "
                f"(DELETE /{endpoint}/duplicates/ignored)"
            )
        marks.append(group)
        return True

    return _change(storage, endpoint, add)


def unmark(storage: Storage, endpoint: str, items: list[int]) -> list[list[int]]:
    """Forget a mark (the same items as marked); 404 when there is none."""
    group = check_group(items)

    def remove(marks: list[list[int]]) -> bool:
        if group not in marks:
            raise ItemNotFoundError(f"{endpoint} has no 'not duplicates' mark of items {group}")
        marks.remove(group)
        return True

    return _change(storage, endpoint, remove)
