"""Staging a version: its new files written into a work folder, each with the blob reference the
manifest will list (sha256 and size); publishing uploads those the store does not hold yet."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.catalog import segment
from service.catalog.head import FUSED_FILE, HEAD_FILES, Head
from service.catalog.rows import Catalog
from service.storage import manifest
from service.storage.blobs import ref_of
from service.storage.manifest import BlobRef, SegmentRef


class Stager:
    """A version's new files: written into `folder`, remembered with their refs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: list[tuple[Path, BlobRef]] = []
        self._count = 0

    def file(self, path: Path) -> BlobRef:
        ref = ref_of(path)
        self.files.append((path, ref))
        return ref

    def image(self, path: Path, sha256: str) -> None:
        """An original image, named by the sha256 of its bytes (known already)."""
        self.files.append((path, BlobRef(sha256, path.stat().st_size)))

    def _new_folder(self, kind: str) -> Path:
        self._count += 1
        folder = self.folder / f"{kind}-{self._count}"
        folder.mkdir(parents=True)
        return folder

    def segment(
        self, catalog: Catalog, n_trees: int, head: bool, index_min_rows: int = segment.INDEX_MIN_ROWS
    ) -> SegmentRef:
        """A new segment of `catalog`'s rows, none of them deleted."""
        parts = segment.write(catalog, self._new_folder("segment"), n_trees, head, index_min_rows)
        files = {name: self.file(path) for name, path in parts.items()}
        return SegmentRef(segment.new_id(), catalog.count, catalog.count, files)

    def deleted(self, mask: np.ndarray) -> BlobRef | None:
        path = segment.write_deleted(mask, self._new_folder("deleted") / "deleted.bits")
        return None if path is None else self.file(path)

    def overlay(self, edits: dict[int, dict[str, object]]) -> BlobRef | None:
        path = segment.write_overlay(edits, self._new_folder("overlay") / "overlay.json")
        return None if path is None else self.file(path)

    def head(self, head: Head, fused: Path | None = None) -> manifest.Head:
        """The head's files; with `fused`, also the backbone and head as one converted model."""
        folder = self._new_folder("head")
        head.save(folder)
        files = {name: self.file(folder / name) for name in HEAD_FILES}
        if fused is not None:
            files[FUSED_FILE] = self.file(fused)
        return manifest.Head(
            head.fingerprint, head.dim, list(head.definition["labels"]), head.thumbnail, files
        )
