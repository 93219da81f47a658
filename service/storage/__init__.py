"""Storage: one small interface over a key/value store of files, picked by URI scheme.

Keys are relative, '/'-separated paths such as `fashion/versions/<v>/index.ann`.
Implementations: `LocalStorage` (file://, plain paths) and `S3Storage` (s3://bucket/prefix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from service.storage.base import KeyNotFoundError, SharedBucket, Storage, check_key

__all__ = ["KeyNotFoundError", "SharedBucket", "Storage", "check_key", "encoder_mirror", "open_storage"]


def open_storage(uri: str, *, endpoint_url: str | None = None, region: str | None = None) -> Storage:
    """Storage for a URI: `file:///abs/path` or a plain path (local), `s3://bucket/prefix`."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        from service.storage.local import LocalStorage

        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise ValueError(
                f"{uri!r}: a file:// URI needs an absolute path (file:///srv/data), or give a plain path"
            )
        return LocalStorage(Path(parsed.path if parsed.scheme == "file" else uri))
    if parsed.scheme == "s3":
        from service.storage.s3 import S3Storage

        return S3Storage(parsed.netloc, parsed.path, endpoint_url=endpoint_url, region=region)
    raise ValueError(f"unsupported STORAGE_URI scheme {parsed.scheme!r} in {uri!r} (use file:// or s3://)")


def encoder_mirror(settings: Any, storage: Storage) -> Storage | None:
    """Where mirrored TF-Hub encoders live: ENCODER_MIRROR_URI, else the store itself when every
    instance reaches it (a shared bucket)."""
    if settings.encoder_mirror_uri:
        return open_storage(
            settings.encoder_mirror_uri, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
        )
    return storage if storage.as_bucket() is not None else None
