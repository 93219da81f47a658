"""Migration of a format-1 version (a folder of files, every change a full copy) to format 2 (a
manifest of content-addressed blobs): its files become blobs as they are (copied inside the store:
nothing is downloaded, decoded or embedded), plus the two small arrays a segment has that a
format-1 version lacks (its images' digests and its items' name keys). The version it migrates stays
as it was, so a rollback to it works until it is pruned.

The first change to an endpoint still on format 1 migrates it first; `python -m service migrate`
does it ahead of time (do that for large catalogs: copying their images takes a while).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from service.catalog.segment import FILE_NAMES, Segment, name_key
from service.core.endpoint import EndpointSpec
from service.storage import Storage, versions
from service.storage.manifest import BlobRef, SegmentRef, blob_key
from service.training.base import Base
from service.training.built import Built
from service.training.results import ChangeResult
from service.training.stage import Stager

log = logging.getLogger(__name__)


class Migration:
    """Build a format-2 version from a format-1 base (built again if the base changes meanwhile)."""

    migrates = True  # publish_with_rebase: this is the migration, not a change that needs one

    def __init__(self, spec: EndpointSpec, storage: Storage) -> None:
        self.spec = spec
        self.storage = storage

    def build(self, base: Base | None, stager: Stager, version: str) -> Built:
        if base is None:
            raise versions.RebaseError(f"{self.spec.name} has no version any more")
        old = base.manifest
        if old.format != 1:  # migrated meanwhile by another change: nothing left to do
            raise versions.RebaseError(f"{self.spec.name} was migrated meanwhile")
        segment = base.view.segments[0]
        files = self._copy_files(old.segments[0], segment, stager)
        live = int(np.count_nonzero(~segment.deleted))
        migrated = SegmentRef(id=f"m1-{old.version}", rows=segment.rows, live=live, files=files)
        self._copy_images(segment)
        manifest = old.with_changes(
            format=2,
            segments=(migrated,),
            encoder_model=self._copy(old.encoder_model),
            head=replace(old.head, files={n: self._copy_one(r) for n, r in old.head.files.items()})
            if old.head
            else None,
            change={"kind": "migrate", "from": old.version},
        )
        result = ChangeResult("", "migrate", [], manifest.count, {"migrated": True, "rows": segment.rows})
        return Built(manifest, set(), result)

    def _copy(self, ref: BlobRef | None) -> BlobRef | None:
        """A format-1 file as a blob: copied inside the store under its content's key."""
        return None if ref is None else self._copy_one(ref)

    def _copy_one(self, ref: BlobRef) -> BlobRef:
        assert ref.key is not None
        self.storage.copy(ref.key, blob_key(self.spec.name, ref.sha256))
        return BlobRef(ref.sha256, ref.size)

    def _copy_files(self, ref: SegmentRef, segment: Segment, stager: Stager) -> dict[str, BlobRef]:
        files = {name: self._copy_one(blob) for name, blob in ref.files.items()}
        folder = stager.folder / "migrated"
        folder.mkdir(parents=True, exist_ok=True)
        if "items" not in files:  # built before stable ids: the row is the id
            np.save(folder / FILE_NAMES["items"], np.arange(segment.rows, dtype=np.int64), allow_pickle=False)
            files["items"] = stager.file(folder / FILE_NAMES["items"])
        np.save(folder / FILE_NAMES["digests"], np.asarray(segment.digests), allow_pickle=False)
        keys = np.array(
            [name_key(e.get("item_name") or n) for e, n in zip(segment.entries, segment.names, strict=True)],
            dtype=np.uint64,
        )
        np.save(folder / FILE_NAMES["keys"], keys, allow_pickle=False)
        files["digests"] = stager.file(folder / FILE_NAMES["digests"])
        files["keys"] = stager.file(folder / FILE_NAMES["keys"])
        return files

    def _copy_images(self, segment: Segment) -> None:
        """Every row's image, from the version's folder to its blob (server-side on S3)."""
        images = {e["image"]: e["sha256"] for e in segment.entries}
        prefix = segment.ref.images or ""
        jobs = [(prefix + image, blob_key(self.spec.name, sha)) for image, sha in images.items()]
        workers = max(1, self.storage.upload_concurrency)
        with ThreadPoolExecutor(workers, thread_name_prefix="migrate") as pool:
            for future in [pool.submit(self.storage.copy, source, target) for source, target in jobs]:
                future.result()
        log.info("%s: copied %d images into blobs", self.spec.name, len(jobs))
