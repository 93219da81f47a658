"""Rows being built: stable item ids, names, labels, metadata, images and vectors, in memory, on the
way into a segment (catalog/segment.py writes them; `segment.to_catalog` reads some back).

One row is one image. Each row belongs to an item with a stable id that survives every later
version while the item exists. Beside the vectors served, a row keeps what a later change needs so
that nothing embedded before is embedded again: the backbone's vector, the head's thumbnail input,
and the backbone's vector of the mirrored image (head augmentation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

DELETED = -1


@dataclass
class Catalog:
    """Every row of a version, in index order, plus what a change needs to build the next one."""

    items: np.ndarray  # int64 [n]: the item id of each row, DELETED for a tombstone
    names: list[str]  # each row's image name: its path in the zip
    # {"label", "metadata", "image", "sha256", "item_name"?} per row; `item_name` groups the
    # photos of one item (the metadata file's `item` column); without it the item is the image.
    entries: list[dict[str, Any]]
    vectors: np.ndarray  # float32 [n, dim]: what the index holds
    backbone: np.ndarray  # float32 [n, D]
    thumbs: np.ndarray  # float32 [n, T] (T = 0 without thumbnails)
    mirrored: np.ndarray | None  # float32 [n, D], when every row has one
    next_id: int  # the next new item id: ids are never reused
    # Where each row's original image is: a store key to copy from, or None (in the staging folder).
    image_sources: list[str | None] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.names)

    def live(self) -> np.ndarray:
        """Indices of the rows of items that exist."""
        return np.flatnonzero(self.items != DELETED)

    def item_name(self, row: int) -> str:
        """The name of a row's item: its `item` (several photos) or else its image's name."""
        return self.entries[row].get("item_name") or self.names[row]

    def item_ids_by_name(self) -> dict[str, int]:
        return {self.item_name(r): int(self.items[r]) for r in self.live()}

    def take(self, rows: np.ndarray) -> Catalog:
        """The catalog restricted to `rows` (in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        return Catalog(
            items=self.items[rows],
            names=[self.names[r] for r in rows],
            entries=[self.entries[r] for r in rows],
            vectors=self.vectors[rows],
            backbone=self.backbone[rows],
            thumbs=self.thumbs[rows],
            mirrored=None if self.mirrored is None else self.mirrored[rows],
            next_id=self.next_id,
            image_sources=[self.image_sources[r] for r in rows],
        )

    def extend(self, other: Catalog) -> Catalog:
        """This catalog's rows, then `other`'s (its vectors must have the same widths)."""
        mirrored = (
            None
            if self.mirrored is None or other.mirrored is None
            else np.concatenate([self.mirrored, other.mirrored])
        )
        return Catalog(
            items=np.concatenate([self.items, other.items]),
            names=self.names + other.names,
            entries=self.entries + other.entries,
            vectors=np.concatenate([self.vectors, other.vectors]),
            backbone=np.concatenate([self.backbone, other.backbone]),
            thumbs=np.concatenate([self.thumbs, other.thumbs]),
            mirrored=mirrored,
            next_id=max(self.next_id, other.next_id),
            image_sources=self.image_sources + other.image_sources,
        )
