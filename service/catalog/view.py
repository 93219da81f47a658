"""A version's catalog as its segments see it: what serving searches and what a change builds on.

Opening the next version reuses the previous one's segments (`View.open(..., previous=)`): a change
that writes one small segment, a deletion bitmap or an overlay costs that much to open, whatever the
catalog's size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from service.catalog.segment import Fetch, Segment
from service.storage.manifest import Manifest


@dataclass(frozen=True)
class Found:
    """Rows of one segment."""

    segment: int
    rows: np.ndarray


class View:
    """A version's segments, each with this version's deletions and edits."""

    def __init__(self, manifest: Manifest, segments: list[Segment]) -> None:
        self.manifest = manifest
        self.segments = segments

    @classmethod
    def open(cls, manifest: Manifest, fetch: Fetch, search_k: int = 0, previous: View | None = None) -> View:
        reusable = {s.ref.id: s for s in previous.segments} if previous is not None else {}
        segments = []
        for ref in manifest.segments:
            known = reusable.get(ref.id)
            if known is not None and known.ref.files == ref.files:
                segments.append(known if known.ref == ref else known.view(ref))
            else:
                segments.append(Segment(ref, fetch, manifest.dim, search_k))
        return cls(manifest, segments)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)

    # --- finding rows ------------------------------------------------------------------------------

    def item_rows(self, item_id: int) -> Found | None:
        """The live rows of an item (all in one segment: an item's photos arrive together)."""
        if item_id < 0:
            return None
        for i, segment in enumerate(self.segments):
            rows = _rows_of(segment, item_id)
            if len(rows):
                return Found(i, rows)
        return None

    def named_rows(self, name: str) -> Found | None:
        """The live rows of the item with this name."""
        for i, segment in enumerate(self.segments):
            rows = segment.rows_named(name)
            rows = rows[~segment.deleted[rows]] if len(rows) else rows
            if len(rows):
                return Found(i, rows)
        return None

    def live(self) -> Iterator[Found]:
        for i, segment in enumerate(self.segments):
            yield Found(i, segment.live())

    @cached_property
    def digest_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every row's image sha256 (its first 8 bytes as a sorted uint64), with the segment and
        row it is at: the vector cache (an image sent again is not embedded again)."""
        keys, where_seg, where_row = [], [], []
        for i, segment in enumerate(self.segments):
            digests = np.ascontiguousarray(segment.digests)
            keys.append(digests[:, :8].copy().view("<u8").ravel())
            where_seg.append(np.full(segment.rows, i, np.int32))
            where_row.append(np.arange(segment.rows, dtype=np.int64))
        if not keys:
            return np.zeros(0, np.uint64), np.zeros(0, np.int32), np.zeros(0, np.int64)
        flat = np.concatenate(keys)
        order = np.argsort(flat, kind="stable")
        return flat[order], np.concatenate(where_seg)[order], np.concatenate(where_row)[order]

    def find_image(self, sha256: str) -> tuple[int, int] | None:
        """A (segment, row) holding an image with these bytes (deleted rows count: their vectors
        are as good), or None."""
        keys, segs, rows = self.digest_index
        digest = bytes.fromhex(sha256)
        key = np.frombuffer(digest[:8], "<u8")[0]
        lo, hi = np.searchsorted(keys, key, "left"), np.searchsorted(keys, key, "right")
        for j in range(lo, hi):
            segment = self.segments[int(segs[j])]
            if bytes(segment.digests[int(rows[j])]) == digest:
                return int(segs[j]), int(rows[j])
        return None


def _rows_of(segment: Segment, item_id: int) -> np.ndarray:
    order, ordered = _item_order(segment)
    lo, hi = np.searchsorted(ordered, [item_id, item_id + 1])
    rows = np.sort(order[lo:hi])
    return rows[~segment.deleted[rows]]


def _item_order(segment: Segment) -> tuple[np.ndarray, np.ndarray]:
    cached = segment.__dict__.get("_item_order")
    if cached is None:
        order = np.argsort(segment.items, kind="stable")
        cached = segment.__dict__["_item_order"] = (order, np.asarray(segment.items[order]))
    return cached
