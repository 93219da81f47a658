"""Publishing a change: build it on the current version, publish it only while that is still current,
and build it again on the winner when another change got there first (its images are not embedded
again: only the merge is redone). The whole runs under a build lease (storage/blobs.py), so garbage
collection never deletes a blob the change may reference."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from service.catalog.view import View
from service.core.config import Settings
from service.core.endpoint import EndpointSpec
from service.core.errors import ConflictError
from service.storage import KeyNotFoundError, Storage, blobs, versions
from service.storage.blobs import BlobCache
from service.training import steps
from service.training.base import Base, read_base
from service.training.built import Built, Change
from service.training.migration import Migration
from service.training.results import ChangeResult
from service.training.stage import Stager

log = logging.getLogger(__name__)

# A change rebuilt this many times in a row (each time another change won the race) gives up.
MAX_REBASES = 20
# How long a change may hold its lease (a crashed one's expires after this).


def publish_with_rebase(
    storage: Storage,
    spec: EndpointSpec,
    settings: Settings,
    change: Change,
    cache: BlobCache | None = None,
    served: View | None = None,
) -> ChangeResult:
    """Build `change` on the current version and publish it; on a lost race, build it again on the
    winner. `served`: this worker's open view of a recent version, whose segments it reuses."""
    cache = cache or steps.blob_cache(storage, settings)
    with blobs.lease(storage, spec.name) as held:
        version, built = _build_and_publish(storage, spec, settings, change, cache, served, held)
    steps.published(storage, settings, spec.name, version)
    built.result.version, built.result.manifest = version, built.manifest
    return built.result


def _build_and_publish(
    storage: Storage,
    spec: EndpointSpec,
    settings: Settings,
    change: Change,
    cache: BlobCache,
    served: View | None,
    held: blobs.Lease,
) -> tuple[str, Built]:
    for attempt in range(MAX_REBASES):
        try:
            base = read_base(storage, spec.name, cache, spec.search_k, served)
        except KeyNotFoundError:
            if attempt + 1 < MAX_REBASES:  # pruned while we read it: a newer version is current
                continue
            raise
        if base is not None:
            steps.verify_carried(spec.name, base.manifest, cache)  # what the change carries over
        if base is not None and base.manifest.format == 1 and not getattr(change, "migrates", False):
            _migrate_first(storage, spec, settings, cache, served, held)  # a change never writes format 1
            continue
        version = versions.new_version_id()
        try:
            with steps.work_folder(settings, spec.name, "change") as tmp:
                stager = Stager(Path(tmp))
                built = change.build(base, stager, version)
                built.manifest = built.manifest.with_changes(
                    version=version,
                    created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                    base=base.version if base else None,
                    lineage=base.manifest.lineage if base else version,
                )
                _publish(storage, built, base, stager, held)
        except versions.RebaseError:
            log.info("%s: a change lost the race to another; building it again", spec.name)
            continue
        except KeyNotFoundError:
            # A file of the base went missing: a newer version is current. Rebase, unless it is not.
            if versions.read_current(storage, spec.name).tag == (base.pointer.tag if base else None):
                raise
            continue
        built.result.rebases = attempt
        return version, built
    raise ConflictError(f"{spec.name} changed {MAX_REBASES} times while this change was built; send it again")


def _migrate_first(
    storage: Storage,
    spec: EndpointSpec,
    settings: Settings,
    cache: BlobCache,
    served: View | None,
    held: blobs.Lease,
) -> None:
    log.info("%s: its current version is in format 1; migrating it before the change", spec.name)
    _build_and_publish(storage, spec, settings, Migration(spec, storage), cache, served, held)


def _publish(storage: Storage, built: Built, base: Base | None, stager: Stager, held: blobs.Lease) -> None:
    pointer = base.pointer if base else versions.Pointer(None, None)
    try:
        versions.publish(
            storage, built.manifest, stager.files, built.known, base=pointer, change=True, lease=held
        )
    except BaseException:
        versions.withdraw(storage, built.manifest.endpoint, built.manifest.version)
        raise
