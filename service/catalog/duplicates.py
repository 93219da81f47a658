"""Groups of duplicate images in a catalogue: exact (the same bytes: the same sha256) and near
(cosine at or above a threshold), found through each row's nearest neighbours in the index, never
all pairs, and joined into groups with union-find (a duplicate of a duplicate is one group).

Work in progress for issue 22: the grouping only (no job, route or page yet).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

# neighbours(row, k) -> (rows, cosines) of the row's k nearest rows, itself possibly among them
Neighbours = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


class UnionFind:
    """Disjoint sets over rows 0..n-1 (path halving, union by size)."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = int(parent[a])
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]


@dataclass
class Group:
    """One group of duplicates: its rows, the keeper first (the oldest item: the lowest id), and
    each row's cosine to the keeper."""

    rows: list[int]
    scores: list[float] = field(default_factory=list)
    exact: bool = False  # every row holds the same bytes


def find_groups(
    vectors: np.ndarray,
    items: np.ndarray,
    digests: Iterable[bytes],
    neighbours: Neighbours,
    threshold: float,
    k: int = 10,
) -> list[Group]:
    """Groups of two or more live rows (items >= 0) that are duplicates of each other."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    n = len(items)
    sets = UnionFind(n)
    first_of: dict[bytes, int] = {}
    keys = [bytes(d) for d in digests]
    for row, digest in enumerate(keys):
        if items[row] < 0:
            continue
        seen = first_of.setdefault(digest, row)
        if seen != row:
            sets.union(seen, row)
    for row in range(n):
        if items[row] < 0:
            continue
        rows, cosines = neighbours(row, k)
        for other, cosine in zip(rows.tolist(), cosines.tolist(), strict=True):
            if other != row and cosine >= threshold and items[other] >= 0:
                sets.union(row, other)
    members: dict[int, list[int]] = {}
    for row in range(n):
        if items[row] >= 0:
            members.setdefault(sets.find(row), []).append(row)
    groups = []
    for found in members.values():
        if len(found) < 2:
            continue
        found.sort(key=lambda r: (int(items[r]), r))
        keeper = vectors[found[0]]
        scores = [float(np.dot(keeper, vectors[r])) for r in found]
        groups.append(Group(found, scores, exact=len({keys[r] for r in found}) == 1))
    groups.sort(key=lambda g: (-len(g.rows), int(items[g.rows[0]])))
    return groups
