"""The version a change is built on: its pointer (for the compare-and-swap), manifest, segments
(through this instance's blob cache) and head."""

from __future__ import annotations

from dataclasses import dataclass

from service.catalog.head import Head
from service.catalog.view import View
from service.storage import Storage, versions
from service.storage.blobs import BlobCache
from service.storage.manifest import Manifest


@dataclass
class Base:
    pointer: versions.Pointer
    manifest: Manifest
    view: View
    head: Head | None

    @property
    def version(self) -> str:
        return self.manifest.version

    def known(self) -> set[str]:
        """The blobs this version references (its images aside): no new version uploads them again."""
        return {ref.sha256 for ref in self.manifest.blobs() if ref.key is None}


def read_base(
    storage: Storage, endpoint: str, cache: BlobCache, search_k: int = 0, previous: View | None = None
) -> Base | None:
    """The current version (None if there is none); `previous`: a view already open whose segments
    it may share (this worker's served version)."""
    pointer = versions.read_current(storage, endpoint)
    if pointer.version is None:
        return None
    manifest = versions.read_manifest(storage, endpoint, pointer.version)
    view = View.open(manifest, lambda ref, label: cache.path(endpoint, ref, label), search_k, previous)
    head = None
    if manifest.head is not None:
        head = Head.from_files(
            *(cache.path(endpoint, manifest.head.files[n], n) for n in ("head.json", "head.npz"))
        )
    return Base(pointer, manifest, view, head)
