"""A duplicate report over a real version's segments: an indexed one and a small one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.catalog import descriptor
from service.catalog.duplicates import Ignored
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


def view_of(tmp_path: Path, big: np.ndarray, small: np.ndarray, small_digests: list[str]) -> View:
    digests = [f"{i:064x}" for i in range(len(big))]
    stager = Stager(tmp_path / "stage")
    first = stager.segment(rows(len(big), 0, big, digests), n_trees=8, head=False, index_min_rows=10)
    second = stager.segment(rows(len(small), len(big), small, small_digests), n_trees=8, head=False)
    paths = {ref.sha256: path for path, ref in stager.files}
    dim = big.shape[1]
    segments = [Segment(ref, lambda blob, label: paths[blob.sha256], dim) for ref in (first, second)]
    assert segments[0].index is not None and segments[1].index is None
    return View(None, segments)  # type: ignore[arg-type]


def test_duplicates_are_found_across_an_indexed_segment_and_a_small_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    big = rng.standard_normal((descriptor.MIN_FIT + 200, 16)).astype(np.float32)
    big /= np.linalg.norm(big, axis=1, keepdims=True)
    near = big[7] + 0.01 * rng.standard_normal(16).astype(np.float32)
    small = np.stack([near / np.linalg.norm(near), big[20]])  # a near copy of 7, the bytes of 20
    view = view_of(tmp_path, big, small, [f"{99999:064x}", f"{20:064x}"])
    assert not descriptor.of_view(view, head=False).raw  # enough rows to fit a whitening on
    groups = report(view, head=False, threshold=0.9, folder=tmp_path / "work")
    n = len(big)
    found = sorted(([i["id"] for i in g["items"]], g["exact"]) for g in groups)
    assert found == [([7, n], False), ([20, n + 1], True)]
    assert all(g["items"][0]["score"] == 1.0 and g["items"][1]["score"] >= 0.9 for g in groups)
    assert not list((tmp_path / "work").iterdir())  # the descriptors' file is gone

    ignored = report(view, head=False, threshold=0.9, folder=tmp_path / "work", ignored=Ignored([[7, n]]))
    assert [[i["id"] for i in g["items"]] for g in ignored] == [[20, n + 1]]
