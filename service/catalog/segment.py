"""Segments: immutable sets of rows written once (`write`), read back lazily (`Segment`), and each
version's view of one: which of its rows are deleted and which entries were edited.

A segment holds, for each of its rows (one image of an item): the served vector (in an Annoy index
when the segment is large enough, as a plain matrix searched exactly when it is small), the item's
stable id, the image's name and entry (label, metadata, image, sha256), the image's sha256 as bytes
(looked up by the vector cache and the garbage collector) and a hash of the item's name (looked up
by changes), plus what a head trains on (backbone vectors, thumbnails, mirrored vectors). A change
never rewrites these: a delete writes a new bitmap of deleted rows, an edit a new overlay.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from service.catalog import jsonmap
from service.catalog.index import IndexReader, build_index
from service.catalog.rows import DELETED, Catalog
from service.core.errors import IntegrityError
from service.storage.manifest import BlobRef, SegmentRef

# Below this many rows a segment is searched exactly (its vectors as a matrix): no index to build,
# and at 2,000 rows x 256-d the scan costs what Annoy's search of a large segment does
# (index.FILTER_EXACT_ROWS is the same measurement).
INDEX_MIN_ROWS = 2000

# The file each segment part is written to in a staging folder.
FILE_NAMES = {
    "index": "index.ann",
    "vectors": "vectors.npy",
    "items": "items.npy",
    "names": "names.json",
    "entries": "entries.json",
    "digests": "digests.npy",
    "keys": "keys.npy",
    "backbone": "backbone.npy",
    "thumbs": "thumbs.npy",
    "mirrored": "mirrored.npy",
}


def name_key(name: str) -> int:
    """A 64-bit hash of an item's name: what `keys` holds, looked up with a binary search."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def new_id() -> str:
    return secrets.token_hex(8)


def write(
    catalog: Catalog, folder: Path, n_trees: int, head: bool, index_min_rows: int = INDEX_MIN_ROWS
) -> dict[str, Path]:
    """Write a segment of `catalog`'s rows into `folder`; returns each part's file."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {name: folder / file for name, file in FILE_NAMES.items()}
    if catalog.count >= index_min_rows:
        build_index(catalog.vectors, n_trees, out["index"])  # the index holds the vectors too
        del out["vectors"]
    else:
        np.save(out["vectors"], catalog.vectors.astype(np.float32), allow_pickle=False)
        del out["index"]
    np.save(out["items"], catalog.items.astype(np.int64), allow_pickle=False)
    jsonmap.write(out["names"], catalog.names)
    entries = ({**e, "item": int(i)} for e, i in zip(catalog.entries, catalog.items, strict=True))
    jsonmap.write(out["entries"], entries)
    digests = _digests(e["sha256"] for e in catalog.entries)
    np.save(out["digests"], digests, allow_pickle=False)
    keys = np.array([name_key(catalog.item_name(r)) for r in range(catalog.count)], dtype=np.uint64)
    np.save(out["keys"], keys, allow_pickle=False)
    for part, array, wanted in (
        ("backbone", catalog.backbone, head),  # without a head the backbone's vectors are the served ones
        ("thumbs", catalog.thumbs, catalog.thumbs.shape[1] > 0),
        (
            "mirrored",
            catalog.mirrored,
            catalog.mirrored is not None and len(catalog.mirrored) == catalog.count,
        ),
    ):
        if wanted and catalog.count:
            np.save(out[part], np.asarray(array).astype(np.float16), allow_pickle=False)
        else:
            del out[part]
    return out


def _digests(hexes: Iterable[str]) -> np.ndarray:
    """uint8 [n, 32] from sha256 hex strings."""
    return np.frombuffer(b"".join(bytes.fromhex(h) for h in hexes), dtype=np.uint8).reshape(-1, 32).copy()


def write_deleted(mask: np.ndarray, path: Path) -> Path | None:
    """The bitmap of deleted rows (None when no row is deleted)."""
    if not mask.any():
        return None
    path.write_bytes(np.packbits(mask.astype(bool), bitorder="little").tobytes())
    return path


def editable(entry: dict[str, Any]) -> dict[str, Any]:
    """What an overlay holds for a row, and what an edit changes: its label and metadata."""
    return {"label": entry.get("label"), "metadata": entry.get("metadata") or {}}


def write_overlay(edits: dict[int, dict[str, Any]], path: Path) -> Path | None:
    """Edited rows' label and metadata (None when there are none)."""
    if not edits:
        return None
    path.write_text(
        json.dumps({str(r): e for r, e in sorted(edits.items())}, sort_keys=True, ensure_ascii=False)
    )
    return path


# Where a segment's blobs come from: (the part's ref, what it is) -> a local, verified file.
Fetch = Callable[[BlobRef, str], Path]


class Segment:
    """One segment as a version sees it, read lazily (every array memory-mapped or read once)."""

    def __init__(self, ref: SegmentRef, fetch: Fetch, dim: int, search_k: int = 0) -> None:
        self.ref = ref
        self.fetch = fetch
        self.dim = dim
        self.search_k = search_k
        self.rows = ref.rows

    def _path(self, part: str) -> Path | None:
        blob = self.ref.files.get(part)
        return None if blob is None else self.fetch(blob, f"segment {self.ref.id}'s {part}")

    def _array(self, part: str) -> np.ndarray | None:
        path = self._path(part)
        return None if path is None else np.load(path, mmap_mode="r", allow_pickle=False)

    @cached_property
    def items(self) -> np.ndarray:
        """int64 [rows]: each row's item id (-1: a row a format-1 version deleted)."""
        items = self._array("items")
        if items is None:  # a format-1 version from before stable ids: the row is the id
            return np.arange(self.rows, dtype=np.int64)
        if items.shape != (self.rows,) or items.dtype != np.int64:
            raise IntegrityError(f"segment {self.ref.id}: its item ids do not fit its {self.rows} rows")
        return items

    @cached_property
    def names(self) -> jsonmap.JsonLinesMap:
        return jsonmap.JsonLinesMap(self._required("names"), self.rows)

    @cached_property
    def entries(self) -> jsonmap.JsonLinesMap:
        return jsonmap.JsonLinesMap(self._required("entries"), self.rows)

    def _required(self, part: str) -> Path:
        path = self._path(part)
        if path is None:
            raise IntegrityError(f"segment {self.ref.id} has no {part}")
        return path

    @cached_property
    def index(self) -> IndexReader | None:
        path = self._path("index")
        if path is None:
            return None
        reader = IndexReader(path, self.dim, self.search_k)
        if reader.count != self.rows:
            raise IntegrityError(
                f"segment {self.ref.id}: its index holds {reader.count} rows, not {self.rows}"
            )
        return reader

    @cached_property
    def vectors(self) -> np.ndarray:
        """float32 [rows, dim]: the served vectors (from the index when the segment has one)."""
        stored = self._array("vectors")
        if stored is not None and "index" not in self.ref.files:
            if stored.shape != (self.rows, self.dim):
                raise IntegrityError(f"segment {self.ref.id}: vectors of shape {stored.shape}")
            return stored
        index = self.index
        assert index is not None  # a segment has an index or vectors (manifest.parse checks)
        return index.item_vectors(np.arange(self.rows))

    @cached_property
    def digests(self) -> np.ndarray:
        """uint8 [rows, 32]: each row's image sha256."""
        stored = self._array("digests")
        if stored is not None:
            return stored
        return _digests(e["sha256"] for e in self.entries)

    @cached_property
    def keys(self) -> np.ndarray:
        """uint64 [rows]: a hash of each row's item name."""
        stored = self._array("keys")
        if stored is not None:
            return stored
        return np.array(
            [name_key(e.get("item_name") or n) for e, n in zip(self.entries, self.names, strict=True)],
            dtype=np.uint64,
        )

    @cached_property
    def _key_order(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(self.keys, kind="stable")
        return order, np.asarray(self.keys[order])

    def rows_named(self, name: str) -> np.ndarray:
        """The rows whose item has this name (a hash match, checked against the names)."""
        key = np.uint64(name_key(name))
        order, ordered = self._key_order
        lo, hi = np.searchsorted(ordered, key, "left"), np.searchsorted(ordered, key, "right")
        found = [
            int(r)
            for r in order[lo:hi]
            if (self.entries[int(r)].get("item_name") or self.names[int(r)]) == name
        ]
        return np.array(found, dtype=np.int64)

    def training_inputs(
        self, head: bool, rows: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """float32 backbone vectors, thumbnails and (when stored) mirrored vectors of `rows` (all
        rows by default); `head`: the segment's version had a head (its backbone is a file)."""
        picked = np.arange(self.rows) if rows is None else np.asarray(rows, dtype=np.int64)
        backbone = self._array("backbone")
        if backbone is None:
            if head:
                raise IntegrityError(f"segment {self.ref.id} keeps no backbone vectors")
            # Without a head the served vectors are the backbone's: an indexed segment's read from
            # the index's memory map row by row (never the whole matrix copied for a few rows).
            index = self.index
            served = index.item_vectors(picked) if index is not None else self.vectors[picked]
        thumbs = self._array("thumbs")
        mirrored = self._array("mirrored")
        return (
            np.asarray(served if backbone is None else backbone[picked], dtype=np.float32),
            np.zeros((len(picked), 0), np.float32)
            if thumbs is None
            else np.asarray(thumbs[picked], dtype=np.float32),
            None if mirrored is None else np.asarray(mirrored[picked], dtype=np.float32),
        )

    # --- this version's view ----------------------------------------------------------------------

    @cached_property
    def deleted(self) -> np.ndarray:
        """bool [rows]: rows this version does not serve (deleted, or replaced by a newer row)."""
        mask = self.items < 0
        if self.ref.deleted is not None:
            path = self.fetch(self.ref.deleted, f"segment {self.ref.id}'s deletions")
            bits = np.frombuffer(path.read_bytes(), dtype=np.uint8)
            unpacked = np.unpackbits(bits, count=self.rows, bitorder="little").astype(bool)
            if len(unpacked) != self.rows:
                raise IntegrityError(f"segment {self.ref.id}: its deletion bitmap does not fit its rows")
            mask = mask | unpacked
        return mask

    @cached_property
    def overlay(self) -> dict[int, dict[str, Any]]:
        """Edited rows: {row: {"label", "metadata"}}."""
        if self.ref.overlay is None:
            return {}
        try:
            raw = json.loads(self.fetch(self.ref.overlay, f"segment {self.ref.id}'s overlay").read_bytes())
            return {int(row): dict(edit) for row, edit in raw.items()}
        except (ValueError, TypeError, AttributeError):
            raise IntegrityError(f"segment {self.ref.id}: its overlay is not valid") from None

    def live(self) -> np.ndarray:
        """The rows this version serves."""
        return np.flatnonzero(~self.deleted)

    def entry(self, row: int) -> dict[str, Any]:
        """A row's entry with this version's edits applied."""
        entry = self.entries[row]
        edit = self.overlay.get(row)
        return entry if edit is None else {**entry, **edit}

    def view(self, ref: SegmentRef) -> Segment:
        """The same segment under another version's view (its own deletions and overlay), sharing
        everything immutable already read (index, maps, arrays)."""
        other = Segment(ref, self.fetch, self.dim, self.search_k)
        for part in (
            "items",
            "names",
            "entries",
            "index",
            "vectors",
            "digests",
            "keys",
            "_key_order",
            "_item_order",
            "_columns",  # filter columns: built from the raw entries (edited rows are judged apart)
        ):
            if part in self.__dict__:
                other.__dict__[part] = self.__dict__[part]
        if ref.deleted == self.ref.deleted and "deleted" in self.__dict__:
            other.__dict__["deleted"] = self.__dict__["deleted"]
        if ref.overlay == self.ref.overlay and "overlay" in self.__dict__:
            other.__dict__["overlay"] = self.__dict__["overlay"]
        return other


def to_catalog(segment: Segment, rows: np.ndarray, head: bool, next_id: int) -> Catalog:
    """Some of a segment's rows (this version's view of them) as a Catalog, to build another from."""
    backbone, thumbs, mirrored = segment.training_inputs(head, rows)
    return Catalog(
        items=np.asarray(segment.items[rows], dtype=np.int64),
        names=[segment.names[int(r)] for r in rows],
        entries=[{k: v for k, v in segment.entry(int(r)).items() if k != "item"} for r in rows],
        vectors=np.asarray(segment.vectors[rows], dtype=np.float32),
        backbone=backbone,
        thumbs=thumbs,
        mirrored=mirrored,
        next_id=next_id,
        image_sources=[None] * len(rows),
    )


__all__ = ["DELETED", "INDEX_MIN_ROWS", "Segment", "name_key", "to_catalog", "write"]
