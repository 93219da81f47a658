"""Published versions: the storage layout, atomic publish (CURRENT written last) and verified fetch.

<endpoint>/versions/<version>/index.ann      Annoy index (angular)
                              vectors.npy    float32 [count, dim], L2-normalised
                              ids.json       {"<row>": "<name in the zip>"}
                              metadata.json  {"<row>": {"label", "metadata", "image", "sha256", "item"}}
                              rows.npy       int64 [count]: each row's stable item id (-1: deleted)
                              backbone.npy, thumbs.npy, mirrored.npy  stored encoder outputs
                              images/<sha256>.<ext>  the original bytes
                              manifest.json  what, how, and the sha256 of every file above
<endpoint>/CURRENT                            {"version": "<version>"}, written last
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from service.core.errors import ConflictError, IntegrityError, NotFoundError, StorageError
from service.storage import KeyNotFoundError, Storage

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
SAFE_VERSION = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}$")
MANIFEST = "manifest.json"
# Files a serving worker needs. The vectors stay in the store (they are for rebuilding an index,
# not for answering queries), and so do the images, read on demand.
SERVING_FILES = ("index.ann", "ids.json", "metadata.json")
# Served when the version has it (versions built before stable item ids lack it).
# rows.npy: item ids (versions before them have none); encoder.tflite: the converted encoder
# (versions served by TensorFlow have none).
OPTIONAL_SERVING_FILES = ("rows.npy", "encoder.tflite")


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


def version_prefix(endpoint: str, version: str) -> str:
    return f"{endpoint}/versions/{version}/"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def read_manifest(storage: Storage, endpoint: str, version: str) -> dict[str, Any]:
    key = version_prefix(endpoint, version) + MANIFEST
    try:
        manifest = json.loads(storage.read(key))
    except ValueError:
        raise IntegrityError(f"{key} is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{key} is not a JSON object")
    return manifest


def list_versions(storage: Storage, endpoint: str) -> list[str]:
    """Versions with a manifest (i.e. completely uploaded), oldest first."""
    return [v for v in storage.list_folders(f"{endpoint}/versions/") if _complete(storage, endpoint, v)]


def _complete(storage: Storage, endpoint: str, version: str) -> bool:
    """A well-formed version name whose manifest (written after every other file) is there."""
    return bool(SAFE_VERSION.match(version)) and storage.exists(version_prefix(endpoint, version) + MANIFEST)


def _require_complete(storage: Storage, endpoint: str, version: str) -> None:
    if not _complete(storage, endpoint, version):
        raise NotFoundError(f"no complete version {version!r} of endpoint {endpoint!r}")


def prune_versions(storage: Storage, endpoint: str, keep: int, stale_after_s: float = 86400) -> list[str]:
    """Delete all but the newest `keep` complete versions (never the current one).

    Also deletes incomplete versions (no manifest: a build that failed mid-upload) once they are
    older than `stale_after_s`, so a build still uploading is left alone. Returns what it deleted.
    """
    current = read_current(storage, endpoint).version
    folders = [v for v in storage.list_folders(f"{endpoint}/versions/") if SAFE_VERSION.match(v)]
    complete = [v for v in folders if _complete(storage, endpoint, v)]
    doomed = [v for v in complete[: max(0, len(complete) - keep)] if v != current]
    cutoff = (datetime.now(UTC) - timedelta(seconds=stale_after_s)).strftime("%Y%m%dT%H%M%S")
    doomed += [v for v in folders if v not in complete and v != current and v < cutoff]
    deleted = [v for v in doomed if _delete_unless_current(storage, endpoint, v)]
    for version in deleted:
        log.info("deleted %s version %s", endpoint, version)
    return deleted


def delete_version(storage: Storage, endpoint: str, version: str) -> None:
    """Delete a published version; never the current one (roll back or publish first)."""
    _require_complete(storage, endpoint, version)
    if not _delete_unless_current(storage, endpoint, version):
        raise ConflictError(f"{version} is the current version of {endpoint!r}; it cannot be deleted")
    log.info("deleted %s version %s", endpoint, version)


def _delete_unless_current(storage: Storage, endpoint: str, version: str) -> bool:
    """Delete a version unless CURRENT names it, safely against a rollback to it at the same time.

    The manifest goes first: from then on the version is incomplete, so a rollback refuses it
    (or, if its compare-and-swap won already, finds it gone and undoes itself). Then CURRENT is
    read again: if it names the version after all, the manifest is put back and nothing else is
    deleted. Only then do the files go. So CURRENT never names a deleted version for longer than
    a racing rollback takes to notice and undo itself.
    """
    prefix = version_prefix(endpoint, version)
    if read_current(storage, endpoint).version == version:
        return False
    try:
        manifest = storage.read(prefix + MANIFEST)
    except KeyNotFoundError:
        manifest = None  # incomplete already (a failed build): nothing to restore
    storage.delete(prefix + MANIFEST)
    if read_current(storage, endpoint).version == version:
        if manifest is not None:
            storage.write(prefix + MANIFEST, manifest)
        return False
    storage.delete_prefix(prefix)
    return True


def rollback(storage: Storage, endpoint: str, version: str) -> None:
    """Point CURRENT back at an earlier complete version (checked before it is served)."""
    _require_complete(storage, endpoint, version)
    manifest = read_manifest(storage, endpoint, version)
    missing = [n for n in SERVING_FILES if not storage.exists(version_prefix(endpoint, version) + n)]
    if missing or any(n not in manifest.get("files", {}) for n in SERVING_FILES):
        raise IntegrityError(f"version {version} of {endpoint!r} is missing {missing or 'manifest entries'}")
    current = read_current(storage, endpoint)
    pointer = json.dumps({"version": version}).encode()
    if not storage.write_if(f"{endpoint}/{CURRENT}", pointer, current.tag):
        raise StorageError(f"{endpoint}/{CURRENT} changed while rolling back; try again")
    if not storage.exists(version_prefix(endpoint, version) + MANIFEST):
        # Deleted while we switched to it (see _delete_unless_current): switch back, if still ours.
        ours = read_current(storage, endpoint)
        if ours.version == version and current.version is not None:
            storage.write_if(
                f"{endpoint}/{CURRENT}", json.dumps({"version": current.version}).encode(), ours.tag
            )
        raise NotFoundError(f"version {version} of {endpoint!r} was deleted while rolling back to it")
    log.info("rolled %s back to version %s", endpoint, version)


def publish(
    storage: Storage,
    endpoint: str,
    version: str,
    staging: Path,
    manifest: dict[str, Any],
    *,
    base: Pointer | None = None,
    carried: dict[str, tuple[str, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Upload a built version from `staging`, then point CURRENT at it.

    The version's files go under an immutable prefix (files in `carried` are copied inside the
    store from another version: name -> (source key, its manifest entry)), the manifest (with
    every file's sha256) after them, and CURRENT last, so a reader never sees a partial version.

    CURRENT is compare-and-swapped. A full train (no `base`) is refused with SupersededError if a
    train newer than it (started later) was published meanwhile ("the newest upload wins");
    changes published meanwhile do not stop it. A change (`base`: the CURRENT it was built on) is
    published only while CURRENT is still that; otherwise RebaseError, and the caller builds it
    again on the newer version.
    """
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST)
    carried = carried or {}
    entries = {
        p.relative_to(staging).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size} for p in files
    }
    manifest = {
        **manifest,
        "endpoint": endpoint,
        "version": version,
        "files": {**{name: entry for name, (_, entry) in carried.items()}, **entries},
    }
    if base is None:
        _refuse_if_superseded(storage, read_current(storage, endpoint).version, endpoint, version)
    elif read_current(storage, endpoint).tag != base.tag:
        raise RebaseError(f"{endpoint} changed while this change was built")  # before uploading
    prefix = version_prefix(endpoint, version)
    jobs: list[Callable[[], None]] = [
        partial(storage.upload, prefix + name, staging / name) for name in entries
    ]
    jobs += [
        partial(storage.copy, src, prefix + name) for name, (src, _) in carried.items() if name not in entries
    ]
    if storage.upload_concurrency > 1 and len(jobs) > 1:  # thousands of small images to a network store
        with ThreadPoolExecutor(storage.upload_concurrency, thread_name_prefix="upload") as pool:
            for future in [pool.submit(job) for job in jobs]:
                future.result()  # the first failure fails the publish
    else:
        for job in jobs:
            job()
    storage.write(prefix + MANIFEST, json.dumps(manifest, indent=1).encode())

    pointer = json.dumps({"version": version}).encode()
    for _ in range(5):  # retry only when another writer raced us between read and write
        current = read_current(storage, endpoint)
        if base is None:
            _refuse_if_superseded(storage, current.version, endpoint, version)
        elif current.tag != base.tag:
            raise RebaseError(f"{endpoint} changed while this change was published")
        if storage.write_if(f"{endpoint}/{CURRENT}", pointer, current.tag):
            log.info("published %s version %s", endpoint, version)
            return manifest
        if base is not None:
            raise RebaseError(f"{endpoint} changed while this change was published")
    raise StorageError(f"could not update {endpoint}/{CURRENT}: too many concurrent writers")


def _refuse_if_superseded(storage: Storage, current: str | None, endpoint: str, version: str) -> None:
    """A train is superseded by a newer train, or by a change made on one (its `lineage`)."""
    if current is None or current <= version:
        return
    try:
        lineage = str(read_manifest(storage, endpoint, current).get("lineage") or current)
    except (KeyNotFoundError, IntegrityError):
        lineage = current
    if lineage > version:
        raise SupersededError(
            f"version {version} of {endpoint!r} was superseded by {lineage}, uploaded after this "
            "one and published first; this one was not made current"
        )


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


def fetch_serving_files(
    storage: Storage, endpoint: str, version: str, manifest: dict[str, Any], cache_dir: Path
) -> Path:
    """Local folder holding the version's serving files, each checked against the manifest.

    Local stores are read in place and checked on every load. Others are downloaded once into
    `cache_dir`: each file goes to a temporary name, is checked against the manifest's sha256 and
    only then renamed into place, so a partial or corrupt download is never served and a file in
    the cache is known good. A lock per version folder makes worker processes on one instance
    share a single download: the second waits, then finds the files there.
    """
    prefix = version_prefix(endpoint, version)
    expected = {}
    head_files = (manifest.get("head") or {}).get("files", [])  # a fine-tuned version's head
    optional = [n for n in OPTIONAL_SERVING_FILES if n in manifest.get("files", {})]
    for name in (*SERVING_FILES, *optional, *head_files):
        digest = manifest.get("files", {}).get(name, {}).get("sha256")
        if digest is None:
            raise IntegrityError(f"{prefix}{MANIFEST} lists no {name}")
        expected[name] = digest

    in_place = storage.local_path(prefix + MANIFEST)
    if in_place is not None:
        for name, digest in expected.items():
            _check(in_place.parent / name, digest, prefix + name)
        return in_place.parent

    folder = cache_dir / "versions" / endpoint / version
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(version + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, digest in expected.items():
            target = folder / name
            if target.exists():
                continue
            fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                storage.download(prefix + name, tmp)
                _check(tmp, digest, prefix + name)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
    os.utime(folder)  # marks it as in use, for prune_cache
    return folder


def prune_cache(cache_dir: Path, endpoint: str, keep: set[str], min_age_s: float = 600) -> None:
    """Remove downloaded versions not in `keep` and unused for `min_age_s` (other workers may
    still be swapping away from them; their open index files survive the unlink anyway)."""
    base = cache_dir / "versions" / endpoint
    if not base.is_dir():
        return
    for folder in base.iterdir():
        if folder.is_dir() and folder.name not in keep and time.time() - folder.stat().st_mtime > min_age_s:
            shutil.rmtree(folder, ignore_errors=True)
            folder.with_name(folder.name + ".lock").unlink(missing_ok=True)


def _check(path: Path, expected: str, key: str) -> None:
    if not path.is_file():
        raise IntegrityError(f"{key} is missing")
    actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(f"{key} has sha256 {actual[:12]}..., manifest says {expected[:12]}...")
