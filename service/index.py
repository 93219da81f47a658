"""Annoy indexes: build one from unit vectors; open one (mmap) and query it with cosine scores.

Annoy's angular distance on unit vectors is d = sqrt(2 * (1 - cos)), so the score we report,
`1 - d**2 / 2`, is exactly the cosine similarity (1 = same direction, 0 = unrelated).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from annoy import AnnoyIndex

METRIC = "angular"


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

    def warm(self, queries: int = 8) -> None:
        """Touch the index with a few queries so the first real request does not pay page faults."""
        for item in range(min(queries, self.count)):
            self._index.get_nns_by_item(item, 10, search_k=self.search_k)

    def close(self) -> None:
        self._index.unload()
