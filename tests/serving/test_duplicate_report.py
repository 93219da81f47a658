"""A duplicate report over a real version's segments: an indexed one and a small one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.catalog import descriptor
from service.catalog.duplicates import Ignored
from service.catalog.view import View
from service.serving.duplicate_report import report
from tests.helpers import headless_rows, staged_view


def view_of(tmp_path: Path, big: np.ndarray, small: np.ndarray, small_digests: list[str]) -> View:
    view = staged_view(
        tmp_path, (headless_rows(big), 10), (headless_rows(small, len(big), small_digests), 2000)
    )
    assert view.segments[0].index is not None and view.segments[1].index is None
    return view


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
