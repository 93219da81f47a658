"""A duplicate report over a served version: every live row's descriptor (catalog/descriptor.py)
into an Annoy index built on disk, each row's nearest neighbours at or above the threshold and the
rows with the same bytes joined into groups (catalog/duplicates.py). Memory stays a few integers
per row whatever the catalogue's size: descriptors are made a chunk at a time and live in the file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.catalog import descriptor
from service.catalog.duplicates import NEIGHBOURS, DescriptorIndex, Grouper, Ignored
from service.catalog.view import View

# Rows whose descriptors are made at a time (a chunk of backbone vectors: 4096 x 1280 x 4 B = 20 MB).
CHUNK = 4096

# progress(stage, done, total)
Report = Callable[[str, int, int], None]


def _quiet(stage: str, done: int, total: int) -> None:
    pass


def report(
    view: View,
    head: bool,
    threshold: float,
    folder: Path,
    ignored: Ignored | None = None,
    progress: Report = _quiet,
) -> list[dict[str, Any]]:
    """The version's groups of duplicates: each a list of its items (id, name, label, metadata,
    photo, score to the keeper), the keeper (the oldest item) first; the largest groups first."""
    whitening = descriptor.of_view(view, head)
    offsets = np.cumsum([0] + [s.rows for s in view.segments])
    items = np.full(int(offsets[-1]), -1, dtype=np.int64)
    for s, segment in enumerate(view.segments):
        live = segment.live()
        items[offsets[s] + live] = np.asarray(segment.items)[live]
    live_rows = np.flatnonzero(items >= 0)
    mirrors = bool(view.segments) and all("mirrored" in s.ref.files for s in view.segments)
    count = len(live_rows)
    folder.mkdir(parents=True, exist_ok=True)
    index = DescriptorIndex(whitening.dim, folder / "descriptors.ann")
    try:
        # Ids 0..count-1: the live rows' descriptors; count..2*count-1: their mirror images' (when
        # every segment keeps them): a mirrored copy is near its original's mirror image.
        for mirrored in (False, True) if mirrors else (False,):
            for segment in view.segments:
                rows = segment.live()
                for start in range(0, len(rows), CHUNK):
                    chunk = rows[start : start + CHUNK]
                    backbone, _, flipped = segment.training_inputs(head, chunk)
                    source = flipped if mirrored else backbone
                    assert source is not None
                    index.add(whitening.apply(source))
                    progress("describe", index.count, count * (2 if mirrors else 1))
        progress("index", 0, 1)
        index.build()
        cutoff = whitening.cosine(threshold)
        grouper = Grouper(items, ignored)
        grouper.join_equal(np.concatenate([np.asarray(s.digests) for s in view.segments]))
        for n in range(index.count):
            row = live_rows[n % count]
            for other, cosine in index.neighbours(n, NEIGHBOURS):
                if cosine >= cutoff:
                    grouper.join(int(row), int(live_rows[other % count]))
            if n % 5000 == 0:
                progress("compare", n, index.count)
        progress("compare", index.count, index.count)

        def score(keeper: int, row: int) -> float:
            mine, theirs = (int(np.searchsorted(live_rows, r)) for r in (keeper, row))  # its id
            a, b = index.vector(mine), index.vector(theirs)
            best = float(a @ b)
            if mirrors:
                best = max(best, float(index.vector(mine + count) @ b))
            return whitening.score(best)

        out = []
        for group in grouper.groups():
            members = []
            for row in group:
                s = int(np.searchsorted(offsets, row, side="right")) - 1
                members.append(_member(view, s, int(row - offsets[s]), score(group[0], row)))
            digests = {bytes(view.segments[m["segment"]].digests[m.pop("row")]) for m in members}
            for m in members:
                del m["segment"]
            out.append({"exact": len(digests) == 1, "items": members})
        return out
    finally:
        index.close()


def _member(view: View, s: int, row: int, score: float) -> dict[str, Any]:
    segment = view.segments[s]
    entry = segment.entry(row)
    item = int(segment.items[row])
    found = view.item_rows(item)
    photo = 0 if found is None else int(np.searchsorted(found.rows, row))
    return {
        "id": item,
        "name": entry.get("item_name") or segment.names[row],
        "label": entry.get("label"),
        "metadata": entry.get("metadata") or {},
        "photo": photo,
        "score": round(score, 6),
        "segment": s,
        "row": row,
    }
