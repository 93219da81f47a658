"""Duplicate groups (work in progress for issue 22): exact and near, through neighbours only."""

from __future__ import annotations

import numpy as np
import pytest

from service.catalog.duplicates import find_groups


def exact_neighbours(vectors: np.ndarray):  # type: ignore[no-untyped-def]
    def neighbours(row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        cosines = vectors @ vectors[row]
        best = np.argsort(-cosines)[:k]
        return best, cosines[best]

    return neighbours


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def test_near_and_exact_duplicates_form_groups_with_the_oldest_item_first() -> None:
    rng = np.random.default_rng(0)
    base = unit(rng.standard_normal((6, 32)))
    near = unit(base[2] + 0.01 * rng.standard_normal(32))[None]
    vectors = np.concatenate([base, near, base[4:5]])  # row 6 near row 2; row 7 = row 4's bytes
    items = np.array([10, 11, 12, 13, 14, 15, 3, 20])
    digests = [bytes([i]) * 32 for i in range(7)] + [bytes([4]) * 32]
    groups = find_groups(vectors, items, digests, exact_neighbours(vectors), threshold=0.95)
    found = sorted((sorted(g.rows), g.exact) for g in groups)
    assert found == [([2, 6], False), ([4, 7], True)]
    near_group = next(g for g in groups if 6 in g.rows)
    assert near_group.rows[0] == 6  # item 3 is older than item 12
    assert near_group.scores[0] == pytest.approx(1.0) and near_group.scores[1] > 0.95


def test_deleted_rows_and_a_chain_of_duplicates() -> None:
    rng = np.random.default_rng(1)
    a = unit(rng.standard_normal((1, 16)))[0]
    b = unit(a + 0.05 * rng.standard_normal(16))
    c = unit(b + 0.05 * rng.standard_normal(16))
    vectors = np.stack([a, b, c, a])
    items = np.array([1, 2, 3, -1])  # row 3 is deleted
    digests = [bytes([i]) * 32 for i in range(4)]
    groups = find_groups(vectors, items, digests, exact_neighbours(vectors), threshold=0.9)
    assert [sorted(g.rows) for g in groups] == [[0, 1, 2]]  # a~b~c: one group, never row 3


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.01])
def test_a_threshold_outside_zero_to_one_is_refused(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        find_groups(
            np.zeros((1, 2), np.float32),
            np.array([1]),
            [b"x" * 32],
            lambda r, k: (np.array([0]), np.array([1.0])),
            threshold,
        )
