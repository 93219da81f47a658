"""A duplicate report over a real version's segments (work in progress for issue 22)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.catalog.rows import Catalog
from service.catalog.segment import Segment
from service.catalog.view import View
from service.serving.duplicate_report import report
from service.training.stage import Stager


def rows(n: int, first_id: int, vectors: np.ndarray, digests: list[str]) -> Catalog:
    return Catalog(
        items=np.arange(first_id, first_id + n, dtype=np.int64),
        names=[f"x/{first_id + i}.jpg" for i in range(n)],
        entries=[{"label": "x", "metadata": {}, "image": f"images/{d}.jpg", "sha256": d} for d in digests],
        vectors=vectors,
        backbone=vectors,
        thumbs=np.zeros((n, 0), np.float32),
        mirrored=None,
        next_id=first_id + n,
    )


def test_duplicates_are_found_across_an_indexed_segment_and_a_small_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    big = rng.standard_normal((40, 16)).astype(np.float32)
    big /= np.linalg.norm(big, axis=1, keepdims=True)
    near = big[7] + 0.01 * rng.standard_normal(16).astype(np.float32)
    small = np.stack([near / np.linalg.norm(near), big[20]])  # a near copy of 7, the bytes of 20
    digests = [f"{i:064x}" for i in range(40)]
    stager = Stager(tmp_path / "stage")
    first = stager.segment(rows(40, 0, big, digests), n_trees=8, head=False, index_min_rows=10)
    second = stager.segment(rows(2, 40, small, [f"{99:064x}", digests[20]]), n_trees=8, head=False)
    paths = {ref.sha256: path for path, ref in stager.files}
    segments = [Segment(ref, lambda blob, label: paths[blob.sha256], 16) for ref in (first, second)]
    assert segments[0].index is not None and segments[1].index is None
    groups, where = report(View(None, segments), threshold=0.95)  # type: ignore[arg-type]
    found = sorted((sorted(where[r] for r in g.rows), g.exact) for g in groups)
    assert found == [([(0, 7), (1, 0)], False), ([(0, 20), (1, 1)], True)]
