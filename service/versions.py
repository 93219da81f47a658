"""Published versions: the storage layout, atomic publish (CURRENT written last) and verified fetch.

<endpoint>/versions/<version>/index.ann      Annoy index (angular)
                              vectors.npy    float32 [count, dim], L2-normalised
                              ids.json       {"<id>": "<name in the zip>"}
                              metadata.json  {"<id>": {"label": ..., "metadata": {...}, "image": ...}}
                              images/<id>.<ext>  the original bytes
                              manifest.json  what, how, and the sha256 of every file above
<endpoint>/CURRENT                            {"version": "<version>"}, written last
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import IntegrityError, StorageError
from .storage import KeyNotFoundError, Storage

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
SAFE_VERSION = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}$")
MANIFEST = "manifest.json"
# Files a serving worker needs; images stay in the store and are read on demand.
SERVING_FILES = ("index.ann", "vectors.npy", "ids.json", "metadata.json")


class SupersededError(StorageError):
    """A newer version was published while this one was being built."""

    status = 409


def new_version_id(now: datetime | None = None) -> str:
    """Sortable by creation time (to the microsecond), unique: 20261122T170102.123456Z-3f9a1c."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%S.%fZ}-{secrets.token_hex(3)}"


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
        return json.loads(storage.read(key))
    except ValueError:
        raise IntegrityError(f"{key} is not valid JSON") from None


def list_versions(storage: Storage, endpoint: str) -> list[str]:
    """Versions with a manifest (i.e. completely uploaded), oldest first."""
    prefix = f"{endpoint}/versions/"
    return sorted(
        key[len(prefix) :].split("/")[0]
        for key in storage.list(prefix)
        if key.endswith("/" + MANIFEST) and key.count("/") == 3
    )


def publish(
    storage: Storage, endpoint: str, version: str, staging: Path, manifest: dict[str, Any]
) -> dict[str, Any]:
    """Upload a built version from `staging`, then point CURRENT at it.

    The version's files go under an immutable prefix, the manifest (with every file's sha256)
    after them, and CURRENT last, so a reader never sees a partial version. CURRENT is
    compare-and-swapped: if a version newer than ours (started later) was published meanwhile,
    ours is refused with SupersededError instead of rolling the endpoint back.
    """
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        **manifest,
        "endpoint": endpoint,
        "version": version,
        "files": {
            p.relative_to(staging).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in files
        },
    }
    prefix = version_prefix(endpoint, version)
    for path in files:
        storage.upload(prefix + path.relative_to(staging).as_posix(), path)
    storage.write(prefix + MANIFEST, json.dumps(manifest, indent=1).encode())

    pointer = json.dumps({"version": version}).encode()
    for _ in range(5):  # retry only when another writer raced us between read and write
        current = read_current(storage, endpoint)
        if current.version is not None and current.version > version:
            raise SupersededError(
                f"version {version} of {endpoint!r} was superseded by {current.version}, "
                "published while this one was being built; it was not made current"
            )
        if storage.write_if(f"{endpoint}/{CURRENT}", pointer, current.tag):
            log.info("published %s version %s", endpoint, version)
            return manifest
    raise StorageError(f"could not update {endpoint}/{CURRENT}: too many concurrent writers")


def fetch_serving_files(
    storage: Storage, endpoint: str, version: str, manifest: dict[str, Any], cache_dir: Path
) -> Path:
    """Local folder holding the version's serving files, each checked against the manifest.

    Local stores are read in place; others are downloaded once into `cache_dir`, through a
    temporary file renamed into place after its sha256 matched, so a partial or corrupt download
    is never served. Folders are per version, so worker processes share one download.
    """
    prefix = version_prefix(endpoint, version)
    folder = cache_dir / "versions" / endpoint / version
    in_place = storage.local_path(prefix + MANIFEST)
    if in_place is not None:
        folder = in_place.parent
    for name in SERVING_FILES:
        expected = manifest.get("files", {}).get(name, {}).get("sha256")
        if expected is None:
            raise IntegrityError(f"{prefix}{MANIFEST} lists no {name}")
        target = folder / name
        if in_place is None and not target.exists():
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                storage.download(prefix + name, tmp)
                _check(tmp, expected, prefix + name)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            _check(target, expected, prefix + name)
    return folder


def _check(path: Path, expected: str, key: str) -> None:
    if not path.is_file():
        raise IntegrityError(f"{key} is missing")
    actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(f"{key} has sha256 {actual[:12]}..., manifest says {expected[:12]}...")
