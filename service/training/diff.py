"""What changed between two versions of one catalog, item by item: what a `replace` train applies to
its result when changes were published while it ran (so none of them is lost)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.catalog.segment import editable
from service.catalog.view import Found, View

Placement = tuple[str, tuple[int, ...]]  # (segment id, its rows)


@dataclass
class Diff:
    added: dict[int, Found] = field(default_factory=dict)  # items new (or replaced) since: their rows now
    deleted: set[int] = field(default_factory=set)  # items gone since
    edited: dict[int, dict[str, Any]] = field(default_factory=dict)  # items whose label/metadata changed


def placements(view: View) -> dict[int, tuple[int, Placement]]:
    """Every live item of a version: (segment index, (segment id, its rows))."""
    found: dict[int, tuple[int, Placement]] = {}
    for index, segment in enumerate(view.segments):
        live = segment.live()
        if not len(live):
            continue
        ids = np.asarray(segment.items[live])
        order = np.argsort(ids, kind="stable")
        ids, live = ids[order], live[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        for start, end in zip(starts, np.r_[starts[1:], len(ids)], strict=True):
            rows = tuple(sorted(int(r) for r in live[start:end]))
            found[int(ids[start])] = (index, (segment.ref.id, rows))
    return found


def diff(before: View, after: View) -> Diff:
    """Items added or replaced, deleted, and edited in `after` since `before`."""
    old, new = placements(before), placements(after)
    out = Diff(deleted=set(old) - set(new))
    edited_rows = _edited_rows(before, after)
    for item, (index, placement) in new.items():
        prior, here = old.get(item), (index, placement)
        if prior is not None and prior[1] != placement and _same_photos(before, prior, after, here):
            # Moved, not changed: a compaction or a migration rewrote its segment. Edited if its
            # label or metadata differ.
            then, now = _labels(before, prior), _labels(after, here)
            if then != now:
                out.edited[item] = now
        elif prior is None or prior[1] != placement:
            out.added[item] = Found(index, np.array(placement[1], dtype=np.int64))
        elif any((placement[0], row) in edited_rows for row in placement[1]):
            out.edited[item] = _labels(after, (index, placement))
    return out


def _same_photos(before: View, old: tuple[int, Placement], after: View, new: tuple[int, Placement]) -> bool:
    """Whether an item's rows in two places hold the same images (by sha256) under the same names."""

    def photos(view: View, where: tuple[int, Placement]) -> list[tuple[bytes, str]]:
        segment = view.segments[where[0]]
        return sorted((bytes(segment.digests[row]), segment.names[row]) for row in where[1][1])

    return photos(before, old) == photos(after, new)


def _labels(view: View, where: tuple[int, Placement]) -> dict[str, Any]:
    return editable(view.segments[where[0]].entry(where[1][1][0]))


def _edited_rows(before: View, after: View) -> set[tuple[str, int]]:
    """(segment id, row) of rows whose overlay entry differs between the two versions."""
    old = {s.ref.id: s for s in before.segments}
    changed: set[tuple[str, int]] = set()
    for segment in after.segments:
        prior = old.get(segment.ref.id)
        if prior is None or prior.ref.overlay == segment.ref.overlay:
            continue
        for row in set(prior.overlay) | set(segment.overlay):
            if prior.overlay.get(row) != segment.overlay.get(row):
                changed.add((segment.ref.id, row))
    return changed
