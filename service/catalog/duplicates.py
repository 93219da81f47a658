"""Groups of duplicate images: exact (the same bytes: the same sha256) and near (descriptors'
cosine at or above a threshold, catalog/descriptor.py), found through each row's nearest
neighbours in an Annoy index of the descriptors, never all pairs, and joined with union-find (a
duplicate of a duplicate is one group). Memory: a few integers per row; the descriptors are in a
file Annoy builds on disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from annoy import AnnoyIndex

# Each row's neighbours asked for (a group larger than this still joins: through its members),
# the trees of the descriptors' index and the nodes a search inspects (recall of the 10 nearest
# >= 0.99 at 100,000 rows in the bench).
NEIGHBOURS = 10
N_TREES = 10
SEARCH_K = 2_000
# Nearest items by the served index re-scored by descriptor when a new image or a query is checked
# against the catalogue (screening, ?duplicates_only): `make bench` part `duplicates` measures how
# often a copy's original is among them.
CANDIDATES = 20


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


class Ignored:
    """Groups a person marked "not duplicates": two items both in one such group are never joined
    directly (a third item joined to both still makes a group: a different one)."""

    def __init__(self, groups: Iterable[Iterable[int]] = ()) -> None:
        self.marks: dict[int, set[int]] = {}
        for n, group in enumerate(groups):
            for item in group:
                self.marks.setdefault(int(item), set()).add(n)

    def __call__(self, a: int, b: int) -> bool:
        ma, mb = self.marks.get(a), self.marks.get(b)
        return bool(ma and mb and not ma.isdisjoint(mb))


class Grouper:
    """Rows joined into groups; each row is one image of an item (`items[row]`, -1: not served)."""

    def __init__(self, items: np.ndarray, ignored: Ignored | None = None) -> None:
        self.items = np.asarray(items, dtype=np.int64)
        self.sets = UnionFind(len(self.items))
        self.ignored = ignored or Ignored()

    def join(self, a: int, b: int) -> bool:
        ia, ib = int(self.items[a]), int(self.items[b])
        if ia < 0 or ib < 0 or ia == ib or self.ignored(ia, ib):
            return False
        self.sets.union(a, b)
        return True

    def join_equal(self, digests: np.ndarray) -> None:
        """Join the served rows whose images have the same bytes (uint8 [n, 32] sha256)."""
        live = np.flatnonzero(self.items >= 0)
        if len(live) < 2:
            return
        keys = np.ascontiguousarray(digests[live]).view("<u8")  # [n, 4]
        order = np.lexsort(keys.T[::-1])
        same = np.all(keys[order[1:]] == keys[order[:-1]], axis=1)
        for i in np.flatnonzero(same):
            self.join(int(live[order[i]]), int(live[order[i + 1]]))

    def groups(self) -> list[list[int]]:
        """Groups of two or more items: one row per item (its first), the keeper (the oldest item:
        the lowest id) first; the largest groups first."""
        members: dict[int, dict[int, int]] = {}
        for row in np.flatnonzero(self.items >= 0).tolist():
            root = self.sets.find(row)
            if self.sets.size[root] > 1:
                members.setdefault(root, {}).setdefault(int(self.items[row]), row)
        found = [sorted(by_item.items()) for by_item in members.values() if len(by_item) > 1]
        found.sort(key=lambda g: (-len(g), g[0][0]))
        return [[row for _, row in group] for group in found]

    def copies(self) -> list[tuple[int, int]]:
        """Every row of a group whose item is not the group's oldest, with the oldest item's first
        row: all of an item's photos, not only its first (what a screening leaves out)."""
        keeper: dict[int, tuple[int, int]] = {}  # root -> (oldest item, its first row)
        live = np.flatnonzero(self.items >= 0).tolist()
        roots = {row: self.sets.find(row) for row in live if self.sets.size[self.sets.find(row)] > 1}
        for row, root in roots.items():
            item = int(self.items[row])
            if root not in keeper or item < keeper[root][0]:
                keeper[root] = (item, row)
        return [
            (row, keeper[root][1]) for row, root in roots.items() if int(self.items[row]) != keeper[root][0]
        ]


class DescriptorIndex:
    """An Annoy index of unit descriptors built on disk: each row's nearest rows and cosines."""

    def __init__(self, dim: int, path: Path) -> None:
        self.path = path
        self.index = AnnoyIndex(dim, "angular")
        self.index.on_disk_build(str(path))
        self.count = 0

    def add(self, descriptors: np.ndarray) -> None:
        add = self.index.add_item
        for vector in np.asarray(descriptors, dtype=np.float32):
            add(self.count, vector)
            self.count += 1

    def build(self) -> None:
        self.index.build(N_TREES, n_jobs=1)

    def neighbours(self, row: int, k: int = NEIGHBOURS) -> Iterator[tuple[int, float]]:
        """The row's k nearest other rows, with their cosines."""
        ids, distances = self.index.get_nns_by_item(row, k + 1, search_k=SEARCH_K, include_distances=True)
        for other, distance in zip(ids, distances, strict=True):
            if other != row:
                yield other, 1.0 - distance * distance / 2.0

    def vector(self, row: int) -> np.ndarray:
        return np.asarray(self.index.get_item_vector(row), dtype=np.float32)

    def close(self) -> None:
        self.index.unload()
        self.path.unlink(missing_ok=True)
