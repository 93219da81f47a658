"""A version's catalog as rows: stable item ids, names, labels, metadata, images and stored vectors.

One row is one image (one Annoy id, dense per version). Each row belongs to an item with a
stable id that survives every later version while the item exists; a deleted item's rows stay
in the index as tombstones (item id -1) until the next change that rebuilds the index drops them.

A version keeps, beside its index, the vectors a later change needs so that nothing embedded
before is embedded again:
    vectors.npy   float32 [rows, dim]  what the index holds (backbone, or backbone + head)
    backbone.npy  float16 [rows, D]    the backbone's vectors (only when a head was trained)
    mirrored.npy  float16 [rows, D]    the backbone's vectors of mirrored images (head augmentation)
    thumbs.npy    float16 [rows, T]    the head's thumbnail input
    rows.npy      int64   [rows]       the item id of each row; -1 for a deleted item (served)
Each row's entry in metadata.json carries the sha256 of its image bytes: together with the
encoder's fingerprint in the manifest, that is the content address a later train or change
looks its images up by (see `VectorCache`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.catalog import jsonmap
from service.catalog.index import build_index
from service.core.errors import ConflictError
from service.storage import Storage, versions

ROWS = "rows.npy"
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


def empty(dim: int, backbone_dim: int, thumb_dim: int, next_id: int = 0) -> Catalog:
    return Catalog(
        items=np.zeros(0, np.int64),
        names=[],
        entries=[],
        vectors=np.zeros((0, dim), np.float32),
        backbone=np.zeros((0, backbone_dim), np.float32),
        thumbs=np.zeros((0, thumb_dim), np.float32),
        mirrored=np.zeros((0, backbone_dim), np.float32),
        next_id=next_id,
    )


def write(catalog: Catalog, folder: Path, n_trees: int, head: bool, build: bool = True) -> None:
    """Write the row files (and, with `build`, a new index) of `catalog` into `folder`."""
    np.save(folder / "vectors.npy", catalog.vectors.astype(np.float32), allow_pickle=False)
    np.save(folder / ROWS, catalog.items.astype(np.int64), allow_pickle=False)
    if head:  # without a head the backbone's vectors are vectors.npy itself
        np.save(folder / "backbone.npy", catalog.backbone.astype(np.float16), allow_pickle=False)
    if catalog.thumbs.shape[1]:
        np.save(folder / "thumbs.npy", catalog.thumbs.astype(np.float16), allow_pickle=False)
    if catalog.mirrored is not None and len(catalog.mirrored) == catalog.count and catalog.count:
        np.save(folder / "mirrored.npy", catalog.mirrored.astype(np.float16), allow_pickle=False)
    write_maps(catalog, folder)
    if build:
        build_index(catalog.vectors, n_trees, folder / "index.ann")


def write_maps(catalog: Catalog, folder: Path) -> None:
    """ids.json (row -> name) and metadata.json (row -> label, metadata, image, sha256, item)."""
    jsonmap.write(folder / "ids.json", catalog.names)
    jsonmap.write(
        folder / "metadata.json",
        ({**entry, "item": int(item)} for entry, item in zip(catalog.entries, catalog.items, strict=True)),
    )


def read(
    storage: Storage, endpoint: str, version: str, manifest: dict[str, Any], vectors: bool = True
) -> Catalog:
    """A published version's rows, read back from the store (vectors in float32). Without
    `vectors`, only its maps (names, ids, entries): what an edit or a delete needs."""
    prefix = versions.version_prefix(endpoint, version)
    files = manifest.get("files", {})
    with tempfile.TemporaryDirectory(prefix="catalog-") as tmp:
        folder = Path(tmp)

        def fetch(name: str) -> Path | None:
            if name not in files:
                return None
            local = storage.local_path(prefix + name)
            if local is not None:
                return local
            target = folder / name
            storage.download(prefix + name, target)  # listed but gone (pruned): KeyNotFoundError
            return target

        def array(name: str) -> np.ndarray | None:
            path = fetch(name)
            return None if path is None else np.load(path, allow_pickle=False)

        count = int(manifest.get("rows", manifest["count"]))
        names = list(_lines(fetch("ids.json"), count))
        entries = [dict(e) for e in _lines(fetch("metadata.json"), count)]
        rows = array(ROWS)
        items = rows.astype(np.int64) if rows is not None else np.arange(count, dtype=np.int64)
        next_id = int(manifest.get("next_id", int(items.max(initial=-1)) + 1))
        sources: list[str | None] = [prefix + e["image"] for e in entries]
        if not vectors:
            none = np.zeros((count, 0), np.float32)
            return Catalog(items, names, entries, none, none, none, None, next_id, sources)
        stored = array("vectors.npy")
        if stored is None:
            raise ConflictError(f"{endpoint} version {version} keeps no vectors; train the endpoint again")
        vectors_ = stored.astype(np.float32)
        head = bool(manifest.get("head"))
        backbone = array("backbone.npy")
        if backbone is None:
            if head:
                raise ConflictError(
                    f"{endpoint} version {version} was fine-tuned before versions kept their backbone "
                    "vectors; train the endpoint again once to change it item by item"
                )
            backbone = vectors_
        thumbs = array("thumbs.npy")
        mirrored = array("mirrored.npy")
        return Catalog(
            items=items,
            names=names,
            entries=entries,
            vectors=vectors_,
            backbone=backbone.astype(np.float32),
            thumbs=np.zeros((count, 0), np.float32) if thumbs is None else thumbs.astype(np.float32),
            mirrored=None if mirrored is None else mirrored.astype(np.float32),
            next_id=next_id,
            image_sources=sources,
        )


def _lines(path: Path | None, count: int) -> Iterable[Any]:
    if path is None:
        raise ConflictError("the version lacks its id maps")
    return jsonmap.JsonLinesMap(path, count)


@dataclass
class VectorCache:
    """Stored vectors by content: sha256 of an image's bytes -> its row in a published catalog.

    The cache is the catalog in the store: any instance that reads the current version finds
    every image it holds, so a `replace` train of an unchanged image, or a change that re-sends
    one, costs no forward pass. Vectors only count for the same encoder (fingerprint) and the
    same thumbnail size.
    """

    catalog: Catalog | None = None
    rows: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, catalog: Catalog | None) -> VectorCache:
        if catalog is None:
            return cls()
        return cls(catalog, {e["sha256"]: r for r, e in enumerate(catalog.entries) if e.get("sha256")})

    def get(self, sha256: str) -> int | None:
        return self.rows.get(sha256)


def current_catalog(
    storage: Storage, endpoint: str, fingerprint: str, thumb_dim: int
) -> tuple[Catalog | None, Catalog | None]:
    """The current version's rows: their names and ids (always), and the same with vectors when
    they can be reused with this encoder (same fingerprint, same thumbnail size), else None."""
    current = versions.read_current(storage, endpoint).version
    if current is None:
        return None, None
    manifest = versions.read_manifest(storage, endpoint, current)
    names = read(storage, endpoint, current, manifest, vectors=False)
    if manifest.get("encoder", {}).get("fingerprint") != fingerprint:
        return names, None
    try:
        full = read(storage, endpoint, current, manifest)
    except ConflictError:  # fine-tuned before versions kept their backbone vectors
        return names, None
    return names, (full if full.thumbs.shape[1] == thumb_dim else None)


def manifest_summary(catalog: Catalog) -> dict[str, Any]:
    """The manifest's counts: `count` items (what the API reports), `rows` in the index."""
    live = catalog.items[catalog.items != DELETED]
    return {"count": int(len(np.unique(live))), "rows": catalog.count, "next_id": catalog.next_id}


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
