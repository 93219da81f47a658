"""Annoy indexes: build one from unit vectors; open one (mmap) and query it with cosine scores.

Annoy's angular distance on unit vectors is d = sqrt(2 * (1 - cos)), so the score we report,
`1 - d**2 / 2`, is exactly the cosine similarity (1 = same direction, 0 = unrelated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from annoy import AnnoyIndex

METRIC: Literal["angular"] = "angular"


@dataclass(frozen=True)
class Neighbour:
    id: int
    score: float


def build_index(vectors: np.ndarray, n_trees: int, path: Path, seed: int = 42) -> None:
    """Build an angular Annoy index over `vectors` (row i gets id i) and save it to `path`."""
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"need a non-empty [n, dim] array, got shape {vectors.shape}")
    index = AnnoyIndex(vectors.shape[1], METRIC)
    index.set_seed(seed)
    for i, vector in enumerate(vectors):
        index.add_item(i, vector)
    # Trees are built on every core: about 2x faster here, at the price of byte-for-byte
    # reproducibility (which tree a thread builds varies); recall is the same.
    index.build(n_trees, n_jobs=-1)
    index.save(str(path))
    index.unload()


# Nodes to inspect per query, grown with the index so recall stays put. Measured (bench/perf.py,
# 32 trees, clustered 256-d vectors): recall@10 0.963 with 4,000 at 100k and 0.962 with 8,000 at
# 1M vectors (21-23x the speed of exact search; 10,000 there gave 0.977 but only 17-19x). Twice
# the nodes for ten times the items: search_k = 8,000 * (n / 1M) ** 0.3.
AUTO_SEARCH_K_AT_1M = 8000
AUTO_SEARCH_K_EXPONENT = 0.3
AUTO_SEARCH_K_MIN = 1000


def auto_search_k(count: int) -> int:
    return max(AUTO_SEARCH_K_MIN, round(AUTO_SEARCH_K_AT_1M * (count / 1_000_000) ** AUTO_SEARCH_K_EXPONENT))


# Filtered search, tuned with bench/filters.py (100k clustered 256-d vectors, 32 trees; its section
# of docs/BENCHMARKS.md). Reading and scoring one row for exact search costs about as much as 4-8
# nodes inspected by Annoy, but to keep recall@10 at 0.95 Annoy must inspect about 1.5-2x
# search_k / fraction nodes (the 10 best matching rows lie ~10 / fraction deep in its ranking).
# So: exact search over the matching rows when they are at most FILTER_EXACT_ROWS or cost at most
# the nodes Annoy would inspect (a row = FILTER_EXACT_COST nodes); else Annoy with
# n = k / fraction * FILTER_N_MARGIN and search_k = the index's / fraction * FILTER_SEARCH_K_MARGIN.
# At 100k items that puts 50% on Annoy and 10% and below on exact search.
FILTER_EXACT_ROWS = 2000
FILTER_EXACT_COST = 4.0
FILTER_N_MARGIN = 2.0
FILTER_SEARCH_K_MARGIN = 1.5


def best(rows: np.ndarray, scores: np.ndarray, k: int, groups: np.ndarray | None) -> list[Neighbour]:
    """The k best (row, score) pairs, best first; with `groups`, only each group's best row."""
    order = np.argsort(-scores, kind="stable")
    rows, scores = rows[order], scores[order]
    if groups is not None:
        _, first = np.unique(groups[rows], return_index=True)  # each group's best row
        first.sort()
        rows, scores = rows[first], scores[first]
    return [Neighbour(int(r), float(s)) for r, s in zip(rows[:k], scores[:k], strict=True)]


def cosine_from_angular(distance: float) -> float:
    return max(-1.0, min(1.0, 1.0 - distance * distance / 2.0))


class IndexReader:
    """A saved index opened read-only; the file is mmapped so worker processes share its pages."""

    def __init__(self, path: Path, dim: int, search_k: int = 0) -> None:
        self.path = path
        self.dim = dim
        self._index = AnnoyIndex(dim, METRIC)
        self._index.load(str(path))  # mmap, not a copy
        self.count = self._index.get_n_items()
        self.search_k = search_k if search_k else auto_search_k(self.count)
        self._matrix: np.ndarray | Literal[False] | None = None  # item vectors in the mmap, when read

    def query(self, vector: np.ndarray, k: int) -> list[Neighbour]:
        """The k nearest items to `vector`, best first."""
        ids, distances = self._index.get_nns_by_vector(
            vector.tolist(), k, search_k=self.search_k, include_distances=True
        )
        return [Neighbour(i, cosine_from_angular(d)) for i, d in zip(ids, distances, strict=True)]

    def similar_to_item(self, item: int, k: int) -> list[Neighbour]:
        """The k nearest items to an indexed item, excluding the item itself."""
        ids, distances = self._index.get_nns_by_item(
            item, k + 1, search_k=self.search_k, include_distances=True
        )
        pairs = [(i, d) for i, d in zip(ids, distances, strict=True) if i != item]
        return [Neighbour(i, cosine_from_angular(d)) for i, d in pairs[:k]]

    def candidates(self, vector: np.ndarray, n: int, search_k: int) -> tuple[np.ndarray, np.ndarray]:
        """Annoy's n nearest rows to `vector` (inspecting `search_k` nodes) and their cosine scores."""
        ids, distances = self._index.get_nns_by_vector(
            vector.tolist(), n, search_k=search_k, include_distances=True
        )
        d = np.asarray(distances, dtype=np.float64)
        return np.asarray(ids, dtype=np.int64), np.clip(1.0 - d * d / 2.0, -1.0, 1.0)

    def item_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of `rows`, [len(rows), dim] float32 (unit vectors, as indexed)."""
        if self._matrix is None:
            self._matrix = self._item_matrix()
        if self._matrix is not False:
            return self._matrix[rows]
        get = self._index.get_item_vector
        return np.array([get(int(r)) for r in rows], dtype=np.float32).reshape(len(rows), self.dim)

    def _item_matrix(self) -> np.ndarray | Literal[False]:
        """The items' vectors read in place from the mmapped file, or False if its layout is not the
        one expected (then `item_vectors` asks Annoy row by row: about 10x slower on 10,000 rows).

        An angular index file is an array of nodes, the items first: each node is an int32
        descendant count, two int32 children and `dim` float32 values. Checked against
        `get_item_vector` on a few rows before it is trusted.
        """
        if self.count == 0:
            return False
        width = 3 + self.dim
        raw = np.memmap(self.path, dtype=np.float32, mode="r")
        if len(raw) % width:
            return False
        matrix = raw.reshape(-1, width)[: self.count, 3:]
        for row in {0, self.count // 2, self.count - 1}:
            if not np.array_equal(matrix[row], np.asarray(self._index.get_item_vector(row), np.float32)):
                return False
        return matrix

    def query_masked(
        self, vector: np.ndarray, k: int, mask: np.ndarray, groups: np.ndarray | None = None
    ) -> list[Neighbour]:
        """The k best rows among those where `mask` is True, best first; with `groups` (row -> item),
        the best row of each of the k best items. Fewer than k only when fewer items match.

        Few matching rows: exact search over them. Many: Annoy over-fetches (n and search_k grown by
        1 / the matching fraction), keeps the matching rows, and doubles both until k are found;
        past the exact-search cost it switches to exact search, so the answer is always complete.
        """
        matching = int(np.count_nonzero(mask))
        if matching == 0:
            return []
        fraction = matching / self.count
        base = self.search_k if self.search_k > 0 else auto_search_k(self.count)
        search_k = math.ceil(base / fraction * FILTER_SEARCH_K_MARGIN)
        n = math.ceil(k / fraction * FILTER_N_MARGIN)
        while n < self.count and not self._exact_is_cheaper(matching, search_k):
            ids, scores = self.candidates(vector, n, max(search_k, n))
            keep = mask[ids]
            found = best(ids[keep], scores[keep], k, groups)
            if len(found) == k:
                return found
            n, search_k = n * 2, search_k * 2
        return self.exact_masked(vector, k, mask, groups)

    def _exact_is_cheaper(self, matching: int, search_k: int) -> bool:
        return matching <= FILTER_EXACT_ROWS or matching * FILTER_EXACT_COST <= search_k

    def exact_masked(
        self, vector: np.ndarray, k: int, mask: np.ndarray, groups: np.ndarray | None = None
    ) -> list[Neighbour]:
        """Exact search over the rows where `mask` is True (their vectors come from the index)."""
        rows = np.flatnonzero(mask)
        scores = self.item_vectors(rows) @ np.asarray(vector, dtype=np.float32)
        if groups is None and len(rows) > k:  # only the top k need sorting
            top = np.argpartition(-scores, k - 1)[:k]
            rows, scores = rows[top], scores[top]
        return best(rows, scores.astype(np.float64), k, groups)

    def warm(self, queries: int = 8) -> None:
        """Touch the index with a few queries so the first real request does not pay page faults."""
        for item in range(min(queries, self.count)):
            self._index.get_nns_by_item(item, 10, search_k=self.search_k)

    def close(self) -> None:
        self._index.unload()
