"""A duplicate report over a served version (work in progress for issue 22): every live row's
neighbours through the version's own search (Annoy per indexed segment, the small segments
scanned), grouped by catalog/duplicates.py. Rows are numbered across the version's segments."""

from __future__ import annotations

import numpy as np

from service.catalog.duplicates import Group, find_groups
from service.catalog.view import View
from service.serving.search import search


def report(view: View, threshold: float, k: int = 10) -> tuple[list[Group], list[tuple[int, int]]]:
    """The version's duplicate groups, and where each global row is (segment, row in it)."""
    where = [(s, r) for s, segment in enumerate(view.segments) for r in range(segment.rows)]
    offsets = np.cumsum([0] + [segment.rows for segment in view.segments])
    items = np.full(len(where), -1, dtype=np.int64)
    for s, segment in enumerate(view.segments):
        live = segment.live()
        items[offsets[s] + live] = np.asarray(segment.items)[live]
    vectors = np.concatenate([np.asarray(s.vectors, dtype=np.float32) for s in view.segments])
    digests = [bytes(d) for s in view.segments for d in np.asarray(s.digests)]

    def neighbours(row: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        hits = search(view, vectors[row], count)
        return (
            np.array([offsets[h.segment] + h.row for h in hits], dtype=np.int64),
            np.array([h.score for h in hits], dtype=np.float64),
        )

    return find_groups(vectors, items, digests, neighbours, threshold, k), where
