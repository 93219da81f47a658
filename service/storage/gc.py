"""Garbage collection of blobs: what no retained version references goes, never what a build in
progress may reference (blobs.collector_lock keeps builds and the collector apart).

Two passes, the way LanceDB's cleanup and OCI registries' garbage collection split the work:
- after each prune, the pruned versions' own files (segment parts, deletion bitmaps, overlays,
  heads, converted encoders) that no retained version lists: known from the manifests alone, so it
  costs what the prune removed, not the catalog's size;
- a sweep (`python -m service gc`, and after each compaction): mark every blob the retained
  versions reference, their segments' images included, list the endpoint's blobs and delete the
  rest. Its cost grows with the catalog, so it runs as a job, never on a request.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.storage.base import KeyNotFoundError, Storage
from service.storage.blobs import collector_lock
from service.storage.manifest import Manifest, blob_key
from service.storage.versions import list_versions, read_current, read_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Collected:
    deleted: int  # blobs
    deferred: bool  # a build held a lease (or another collection ran): nothing was deleted


def retained(storage: Storage, endpoint: str) -> list[Manifest]:
    """Every complete version's manifest, CURRENT's included."""
    names = set(list_versions(storage, endpoint))
    current = read_current(storage, endpoint).version
    if current is not None:
        names.add(current)
    found = []
    for version in sorted(names):
        try:
            found.append(read_manifest(storage, endpoint, version))
        except KeyNotFoundError:
            continue  # deleted meanwhile
    return found


def _files(manifests: Iterable[Manifest]) -> set[str]:
    """The blobs these versions list (their images aside), by sha256."""
    return {ref.sha256 for m in manifests for ref in m.blobs() if ref.key is None}


def collect_pruned(storage: Storage, endpoint: str, pruned: list[Manifest]) -> Collected:
    """Delete the files only the pruned versions listed (images are the sweep's)."""
    if not pruned:
        return Collected(0, False)
    with collector_lock(storage, endpoint) as free:
        if not free:
            return Collected(0, True)
        garbage = _files(pruned) - _files(retained(storage, endpoint))
        storage.delete_many([blob_key(endpoint, sha) for sha in sorted(garbage)])
    if garbage:
        log.info("%s: deleted %d blobs only pruned versions held", endpoint, len(garbage))
    return Collected(len(garbage), False)


def sweep(storage: Storage, endpoint: str) -> Collected:
    """Delete every blob of the endpoint that no retained version references.

    The mark (every retained segment's digests: a cost that grows with the catalog) runs before the
    collector's lock is taken, so builds wait only for the final check and the deletes. Under the
    lock, versions published since the mark are marked too; blobs uploaded since the listing are not
    in it; and a build still running holds a lease, which defers the whole collection."""
    manifests = retained(storage, endpoint)
    seen: set[str] = set()
    keep = _marked(storage, endpoint, manifests, seen)
    present = storage.list(f"{endpoint}/blobs/")
    with collector_lock(storage, endpoint) as free:
        if not free:
            return Collected(0, True)
        marked = {m.version for m in manifests}
        newer = [m for m in retained(storage, endpoint) if m.version not in marked]
        keep |= _marked(storage, endpoint, newer, seen)
        garbage = [key for key in present if key.rsplit("/", 1)[-1] not in keep]
        storage.delete_many(garbage)
    log.info("%s: swept %d of %d blobs", endpoint, len(garbage), len(present))
    return Collected(len(garbage), False)


def _marked(storage: Storage, endpoint: str, manifests: list[Manifest], seen: set[str]) -> set[str]:
    """Every blob the versions reference: their files, and the images of their segments' rows
    (read from each segment's digests, once per segment: `seen` holds the digests already read)."""
    keep = _files(manifests)
    with tempfile.TemporaryDirectory(prefix="gc-") as tmp:
        for manifest in manifests:
            for segment in manifest.segments:
                digests = segment.files.get("digests")
                if segment.images is not None or digests is None or digests.sha256 in seen:
                    continue  # a format-1 segment's images live in its version's folder
                seen.add(digests.sha256)
                path = Path(tmp) / digests.sha256
                storage.download(digests.key_in(endpoint), path)
                rows = np.load(path, allow_pickle=False)
                keep.update(bytes(row).hex() for row in rows)
                path.unlink()
    return keep
