"""Duplicates at the door (`on_duplicate=flag|skip` on /train and /items): which of a job's new
images copy an item the catalogue holds, or an earlier image of the same zip, judged on the same
whitened descriptors as the duplicate report (catalog/descriptor.py).

Against the catalogue: the new image's nearest items by the served index (CANDIDATES of them, the
item it replaces excluded) re-scored by descriptor. Within the zip: an index of the new images'
descriptors, grouped the way a report groups, the oldest item of each group kept.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.catalog import descriptor
from service.catalog.duplicates import CANDIDATES, DescriptorIndex, Grouper
from service.catalog.rows import Catalog
from service.catalog.view import View

MODES = ("allow", "flag", "skip")
# Duplicates listed in a job's result (the count is always whole).
LISTED = 1000


@dataclass
class Duplicate:
    row: int  # the new image's row in the job's catalog
    of_id: int  # the item it copies
    of_name: str
    score: float
    within: bool  # of an earlier image of the same zip (else of the catalogue)


def candidates(view: View, vector: np.ndarray, k: int, exclude: int) -> list[tuple[int, int]]:
    """About the k rows nearest `vector` by the served vectors in each segment (Annoy over an
    indexed one, a scan of a small one), its live rows only, item `exclude`'s left out."""
    found: list[tuple[int, int]] = []
    for s, segment in enumerate(view.segments):
        if not segment.rows:
            continue
        if segment.index is not None:
            rows, _ = segment.index.candidates(vector, 2 * k, segment.index.search_k)
        else:
            scores = np.asarray(segment.vectors, dtype=np.float32) @ np.asarray(vector, dtype=np.float32)
            rows = np.argsort(-scores)[: 2 * k]
        ok = ~segment.deleted[rows] & (np.asarray(segment.items)[rows] != exclude)
        found.extend((s, int(r)) for r in rows[ok][:k])
    return found


def against_catalogue(
    new: Catalog, served: np.ndarray, base: View, head: bool, threshold: float
) -> list[Duplicate]:
    """New rows (served vectors `served`) whose best catalogue match scores >= threshold."""
    whitening = descriptor.of_view(base, head)
    mine = whitening.apply(new.backbone)
    found = []
    for row in range(new.count):
        item = int(new.items[row])
        by_segment: dict[int, list[int]] = defaultdict(list)
        for s, r in candidates(base, served[row], CANDIDATES, exclude=item):
            by_segment[s].append(r)
        best: tuple[float, int, int] | None = None
        for s, rows in by_segment.items():
            segment = base.segments[s]
            theirs = whitening.apply(descriptor.backbone_of(segment, head, np.array(rows)))
            scores = theirs @ mine[row]
            top = int(np.argmax(scores))
            if best is None or scores[top] > best[0]:
                best = (float(scores[top]), s, rows[top])
        if best is not None and whitening.score(best[0]) >= threshold:
            segment = base.segments[best[1]]
            entry = segment.entry(best[2])
            name = entry.get("item_name") or segment.names[best[2]]
            found.append(Duplicate(row, int(segment.items[best[2]]), name, whitening.score(best[0]), False))
    return found


def within(
    new: Catalog, whitening: descriptor.Whitening, threshold: float, rows: np.ndarray
) -> list[Duplicate]:
    """Among `rows` of the new catalog: each group's rows but the oldest item's, as its copies."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) < 2:
        return []
    mine = whitening.apply(new.backbone[rows])
    grouper = Grouper(new.items[rows])
    digests = np.frombuffer(
        b"".join(bytes.fromhex(new.entries[int(r)]["sha256"]) for r in rows), np.uint8
    ).reshape(-1, 32)
    grouper.join_equal(digests)
    with tempfile.TemporaryDirectory(prefix="screen-") as tmp:
        index = DescriptorIndex(whitening.dim, Path(tmp) / "new.ann")
        try:
            index.add(mine)
            index.build()
            for n in range(len(rows)):
                for other, cosine in index.neighbours(n):
                    if cosine >= whitening.cosine(threshold):
                        grouper.join(n, other)
        finally:
            index.close()
    found = []
    for n, keeper in grouper.copies():
        score = whitening.score(float(mine[n] @ mine[keeper]))
        of = int(rows[keeper])
        found.append(Duplicate(int(rows[n]), int(new.items[of]), new.item_name(of), score, True))
    return found


def screen(
    new: Catalog, served: np.ndarray, base: View | None, head: bool, threshold: float
) -> list[Duplicate]:
    """The new rows that duplicate the catalogue (`base`, None for a train: it replaces it) or an
    earlier image of the job, each once, in row order."""
    found = against_catalogue(new, served, base, head, threshold) if base is not None and base.rows else []
    copied = {d.row for d in found}
    whitening = (
        descriptor.of_view(base, head) if base is not None and base.rows else descriptor.fit(*_sample(new))
    )
    rest = np.array([r for r in range(new.count) if r not in copied], dtype=np.int64)
    found.extend(within(new, whitening, threshold, rest))
    return sorted(found, key=lambda d: d.row)


def _sample(new: Catalog) -> tuple[np.ndarray, np.ndarray | None]:
    rows = descriptor.sample_rows(new.count)
    return new.backbone[rows], None if new.mirrored is None else new.mirrored[rows]


def describe(new: Catalog, found: list[Duplicate], mode: str, threshold: float) -> dict[str, Any]:
    """What a job's result says about them."""
    return {
        "mode": mode,
        "threshold": threshold,
        "found": len(found),
        "skipped": len(found) if mode == "skip" else 0,
        "listed": [
            {
                "name": new.names[d.row],
                "item": new.item_name(d.row),
                "duplicate_of": {
                    "id": d.of_id,
                    "name": d.of_name,
                    "in": "upload" if d.within else "catalogue",
                },
                "score": round(d.score, 6),
            }
            for d in found[:LISTED]
        ],
    }
