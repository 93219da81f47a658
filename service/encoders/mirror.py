"""A mirror of TF-Hub encoders in the service's bucket, so instances never fetch from tfhub.dev.

`python -m service encoders mirror` (on a machine with internet access) downloads each
endpoint's handle and uploads the SavedModel to `encoders/<id>/` in the store, with
`MIRROR.json` (the handle and every file's sha256) written last. Instances in ENCODER_MODE=mirror
download that folder once into their cache, check every file, and load it from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from service.core.errors import EncoderUnavailableError, IntegrityError
from service.storage import KeyNotFoundError, Storage
from service.storage.versions import sha256_file

log = logging.getLogger(__name__)

MARKER = "MIRROR.json"


def mirror_id(handle: str) -> str:
    return hashlib.sha1(handle.encode()).hexdigest()[:16]


def upload(storage: Storage, handle: str, folder: Path) -> str:
    """Copy a downloaded SavedModel folder to the mirror; the marker goes last. Returns the prefix."""
    prefix = f"encoders/{mirror_id(handle)}/"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        storage.upload(prefix + path.relative_to(folder).as_posix(), path)
    marker = {"handle": handle, "files": {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}}
    storage.write(prefix + MARKER, json.dumps(marker, indent=1).encode())
    return prefix


def fetch(storage: Storage, handle: str, cache: Path) -> Path:
    """The local folder of a mirrored handle, downloaded and checked on first use."""
    target = cache / f"mirror-{mirror_id(handle)}"
    if (target / MARKER).is_file():
        return target
    prefix = f"encoders/{mirror_id(handle)}/"
    try:
        marker = json.loads(storage.read(prefix + MARKER))
    except KeyNotFoundError:
        raise EncoderUnavailableError(
            f"TF-Hub handle {handle!r} is not mirrored in {storage.uri}/{prefix}: run "
            "`python -m service encoders mirror` on a machine with internet access "
            "(or set ENCODER_MODE=hub to download from TF-Hub)"
        ) from None
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".mirror-"))
    try:
        for name, digest in marker["files"].items():
            local = staging / name
            local.parent.mkdir(parents=True, exist_ok=True)
            storage.download(prefix + name, local)
            if sha256_file(local) != digest:
                raise IntegrityError(f"mirrored encoder file {prefix}{name} does not match its sha256")
        (staging / MARKER).write_text(json.dumps(marker))
        try:
            os.rename(staging, target)  # complete or absent; another worker may have won the race
        except OSError:
            if not (target / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("encoder %s fetched from the mirror into %s", handle, target)
    return target
