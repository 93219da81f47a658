"""Published versions: the storage layout, atomic publish (CURRENT written last), retention, rollback.

<endpoint>/CURRENT                     {"version": "<version>"}, compare-and-swapped, written last
<endpoint>/manifests/<version>.json    a version: a small manifest (storage/manifest.py)
<endpoint>/blobs/<ab>/<sha256>         every file of every version, stored once by its content:
                                       segments' parts, images, heads, converted encoders
<endpoint>/NEXT_ID                     the next new item id (only grows)
<endpoint>/leases/, <endpoint>/GC_LOCK builds in progress, and the garbage collector (blobs.py)
<endpoint>/versions/<version>/...      format-1 versions (a folder of files each): still served,
                                       converted by their endpoint's first change (migrate.py)
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from service.core.errors import ConflictError, IntegrityError, NotFoundError, StorageError
from service.storage import manifest as manifests
from service.storage.base import KeyNotFoundError, Storage
from service.storage.blobs import Lease, sha256_file, upload_missing
from service.storage.manifest import BlobRef, Manifest

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
SAFE_VERSION = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}$")
LEGACY_MANIFEST = "manifest.json"

__all__ = ["sha256_file"]  # re-exported: encoders/convert.py checks its cache with it


class SupersededError(StorageError):
    """A newer version was published while this one was being built."""

    status = 409


class RebaseError(ConflictError):
    """Another version became current while a change was being built on the one before it."""


def new_version_id(now: datetime | None = None) -> str:
    """Sortable by creation time (to the microsecond), unique: 20261122T170102.123456Z-3f9a1c."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%S.%fZ}-{secrets.token_hex(3)}"


def created_at(version: str) -> float:
    """A version id's creation time in Unix seconds (0 for ids not in the usual form)."""
    try:
        return (
            datetime.strptime(version.split("-", 1)[0], "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC).timestamp()
        )
    except ValueError:
        return 0.0


def manifest_key(endpoint: str, version: str) -> str:
    return f"{endpoint}/manifests/{version}.json"


def version_prefix(endpoint: str, version: str) -> str:
    """A format-1 version's folder."""
    return manifests.legacy_prefix(endpoint, version)


@dataclass(frozen=True)
class Pointer:
    """What CURRENT says, and its tag for a conditional rewrite."""

    version: str | None
    tag: str | None


def read_current(storage: Storage, endpoint: str) -> Pointer:
    try:
        data, tag = storage.read_tagged(f"{endpoint}/{CURRENT}")
    except KeyNotFoundError:
        return Pointer(None, None)
    try:
        return Pointer(str(json.loads(data)["version"]), tag)
    except (ValueError, KeyError, TypeError):
        raise StorageError(f"{endpoint}/{CURRENT} is not valid JSON with a 'version'") from None


def read_manifest(storage: Storage, endpoint: str, version: str) -> Manifest:
    """A version's manifest, of either format; KeyNotFoundError when there is none."""
    if not SAFE_VERSION.match(version):
        raise KeyNotFoundError(manifest_key(endpoint, version))
    try:
        data = storage.read(manifest_key(endpoint, version))
    except KeyNotFoundError:
        data = storage.read(version_prefix(endpoint, version) + LEGACY_MANIFEST)  # a format-1 version
    return manifests.parse(data, endpoint, version)


def list_versions(storage: Storage, endpoint: str) -> list[str]:
    """Complete versions (their manifest written), oldest first: format 2, then any format-1 ones."""
    found = {key.rsplit("/", 1)[-1].removesuffix(".json") for key in storage.list(f"{endpoint}/manifests/")}
    found |= {
        v for v in storage.list_folders(f"{endpoint}/versions/") if _legacy_complete(storage, endpoint, v)
    }
    return sorted(v for v in found if SAFE_VERSION.match(v))


def _legacy_complete(storage: Storage, endpoint: str, version: str) -> bool:
    return bool(SAFE_VERSION.match(version)) and storage.exists(
        version_prefix(endpoint, version) + LEGACY_MANIFEST
    )


def _complete(storage: Storage, endpoint: str, version: str) -> bool:
    if not SAFE_VERSION.match(version):
        return False
    return storage.exists(manifest_key(endpoint, version)) or _legacy_complete(storage, endpoint, version)


def _require_complete(storage: Storage, endpoint: str, version: str) -> None:
    if not _complete(storage, endpoint, version):
        raise NotFoundError(f"no complete version {version!r} of endpoint {endpoint!r}")


def prune_versions(
    storage: Storage, endpoint: str, keep: int, stale_after_s: float = 86400
) -> list[Manifest]:
    """Delete all but the newest `keep` complete versions (never the current one); returns the
    manifests deleted (their blobs are the garbage collector's to judge).

    Also deletes format-1 folders a build left incomplete (no manifest), once older than
    `stale_after_s`, so a build still uploading is left alone.
    """
    current = read_current(storage, endpoint).version
    complete = list_versions(storage, endpoint)
    doomed = [v for v in complete[: max(0, len(complete) - keep)] if v != current]
    deleted = []
    for version in doomed:
        manifest = _delete_unless_current(storage, endpoint, version)
        if manifest is not None:
            log.info("deleted %s version %s", endpoint, version)
            deleted.append(manifest)
    cutoff = (datetime.now(UTC) - timedelta(seconds=stale_after_s)).strftime("%Y%m%dT%H%M%S")
    for folder in storage.list_folders(f"{endpoint}/versions/"):
        if SAFE_VERSION.match(folder) and folder < cutoff and folder not in complete and folder != current:
            storage.delete_prefix(version_prefix(endpoint, folder))
    return deleted


def delete_version(storage: Storage, endpoint: str, version: str) -> Manifest:
    """Delete a published version; never the current one (roll back or publish first)."""
    _require_complete(storage, endpoint, version)
    manifest = _delete_unless_current(storage, endpoint, version)
    if manifest is None:
        raise ConflictError(f"{version} is the current version of {endpoint!r}; it cannot be deleted")
    log.info("deleted %s version %s", endpoint, version)
    return manifest


def _delete_unless_current(storage: Storage, endpoint: str, version: str) -> Manifest | None:
    """Delete a version unless CURRENT names it, safely against a rollback to it at the same time;
    the manifest it deleted, or None if it deleted nothing.

    The manifest goes first: from then on the version is incomplete, so a rollback refuses it (or,
    if its compare-and-swap won already, finds it gone and undoes itself). Then CURRENT is read
    again: if it names the version after all, the manifest is put back. So CURRENT never names a
    deleted version for longer than a racing rollback takes to notice and undo itself. A format-1
    version's files go with it; a format-2 version's blobs are left to the garbage collector.
    """
    if read_current(storage, endpoint).version == version:
        return None
    key = manifest_key(endpoint, version)
    legacy = not storage.exists(key)
    if legacy:
        key = version_prefix(endpoint, version) + LEGACY_MANIFEST
    try:
        data = storage.read(key)
    except KeyNotFoundError:
        return None
    storage.delete(key)
    if read_current(storage, endpoint).version == version:
        storage.write(key, data)
        return None
    if legacy:
        storage.delete_prefix(version_prefix(endpoint, version))
    try:
        return manifests.parse(data, endpoint, version)
    except IntegrityError:
        return None


def rollback(storage: Storage, endpoint: str, version: str) -> Manifest:
    """Point CURRENT back at an earlier complete version (its manifest checked first)."""
    _require_complete(storage, endpoint, version)
    manifest = read_manifest(storage, endpoint, version)
    current = read_current(storage, endpoint)
    pointer = json.dumps({"version": version}).encode()
    if not storage.write_if(f"{endpoint}/{CURRENT}", pointer, current.tag):
        raise StorageError(f"{endpoint}/{CURRENT} changed while rolling back; try again")
    if not _complete(storage, endpoint, version):
        # Deleted while we switched to it (see _delete_unless_current): switch back, if still ours.
        ours = read_current(storage, endpoint)
        if ours.version == version and current.version is not None:
            storage.write_if(
                f"{endpoint}/{CURRENT}", json.dumps({"version": current.version}).encode(), ours.tag
            )
        raise NotFoundError(f"version {version} of {endpoint!r} was deleted while rolling back to it")
    log.info("rolled %s back to version %s", endpoint, version)
    return manifest


def publish(
    storage: Storage,
    manifest: Manifest,
    files: Iterable[tuple[Path, BlobRef]],
    known: set[str],
    *,
    base: Pointer,
    change: bool,
    lease: Lease | None = None,
) -> None:
    """Upload a built version's new blobs, its manifest, then point CURRENT at it.

    `files`: the version's new files (local path, ref); those whose sha256 is in `known` (the base
    version holds them) are not uploaded. The manifest goes up after every blob it references and
    CURRENT last, so a reader never sees a partial version.

    CURRENT is compare-and-swapped. A change (`change`) is published only while CURRENT is still its
    `base`; otherwise RebaseError, and the caller builds it again on the newer version. A train is
    refused with SupersededError if a newer train (uploaded after it) was published meanwhile ("the
    newest upload wins"); if only changes to its base's train were, RebaseError: the caller applies
    them to its result (a train never drops a change made while it ran).

    `lease`: the build's; if it lapsed, a collection may have deleted blobs in `known`, so nothing
    is published (StorageError).
    """
    endpoint, version = manifest.endpoint, manifest.version
    _check_current(storage, read_current(storage, endpoint), manifest, base, change)  # before uploading
    upload_missing(storage, endpoint, files, known)
    if lease is not None:
        lease.check()
    storage.write(manifest_key(endpoint, version), manifest.dumps())
    pointer = json.dumps({"version": version}).encode()
    for _ in range(5):  # retry only when another writer raced us between read and write
        current = read_current(storage, endpoint)
        _check_current(storage, current, manifest, base, change)
        if storage.write_if(f"{endpoint}/{CURRENT}", pointer, current.tag):
            log.info("published %s version %s", endpoint, version)
            return
        if change:
            raise RebaseError(f"{endpoint} changed while this change was published")
    raise StorageError(f"could not update {endpoint}/{CURRENT}: too many concurrent writers")


def _check_current(
    storage: Storage, current: Pointer, manifest: Manifest, base: Pointer, change: bool
) -> None:
    if current.tag == base.tag:
        return
    if change:
        raise RebaseError(f"{manifest.endpoint} changed while this change was built")
    if current.version is None:
        return
    lineage = _lineage(storage, manifest.endpoint, current.version)
    if lineage > manifest.version:
        raise SupersededError(
            f"version {manifest.version} of {manifest.endpoint!r} was superseded by {lineage}, uploaded "
            "after this one and published first; this one was not made current"
        )
    if base.version is not None and lineage == _lineage(storage, manifest.endpoint, base.version):
        raise RebaseError(f"{manifest.endpoint} changed while this train ran")


def _lineage(storage: Storage, endpoint: str, version: str) -> str:
    """The train a version descends from (itself, for a train)."""
    try:
        return read_manifest(storage, endpoint, version).lineage
    except (KeyNotFoundError, IntegrityError):
        return version


def withdraw(storage: Storage, endpoint: str, version: str) -> None:
    """Best effort: remove the manifest of a version whose publish failed (unless it became
    current). Its new blobs stay until the garbage collector sweeps them."""
    try:
        if read_current(storage, endpoint).version != version:
            storage.delete(manifest_key(endpoint, version))
    except Exception as exc:  # the store may be what failed
        log.warning("could not remove the unpublished version %s of %s: %s", version, endpoint, exc)


def reserve_ids(storage: Storage, endpoint: str, count: int, floor: int = 0) -> int:
    """Reserve `count` new item ids for the endpoint; returns the first. Ids only ever grow
    (<endpoint>/NEXT_ID, compare-and-swapped), so no two versions, whatever their order, races or
    rollbacks, give one id to two items. `floor`: at least this (endpoints older than the file)."""
    key = f"{endpoint}/NEXT_ID"
    for _ in range(50):
        try:
            data, tag = storage.read_tagged(key)
            current = int(json.loads(data)["next_id"])
        except KeyNotFoundError:
            current, tag = 0, None
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"{key} is not valid JSON with a 'next_id'") from None
        start = max(current, floor)
        if count == 0 and start == current:
            return start
        if storage.write_if(key, json.dumps({"next_id": start + count}).encode(), tag):
            return start
    raise StorageError(f"could not reserve item ids for {endpoint}: too many concurrent writers")


def note_published(cache_dir: Path, endpoint: str, version: str) -> None:
    """Tell this instance's workers that `version` is current now (they check before answering).

    Written after CURRENT, before a job or change reports success: the next request to any
    worker of this instance sees the note and loads the version before it answers.
    """
    folder = cache_dir / "published"
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{endpoint}.")
    with os.fdopen(fd, "w") as f:
        f.write(version)
    os.replace(tmp, folder / endpoint)


def published_note(cache_dir: Path, endpoint: str) -> tuple[int, str | None]:
    """(the note's change time in ns, the version it names); (0, None) when there is none."""
    path = cache_dir / "published" / endpoint
    try:
        stamp = path.stat().st_mtime_ns
        return stamp, path.read_text().strip() or None
    except OSError:
        return 0, None
