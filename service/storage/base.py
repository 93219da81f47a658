"""The storage interface: a key/value store of files; keys are relative '/'-separated paths."""

from __future__ import annotations

import abc
import builtins
from pathlib import Path
from typing import BinaryIO

from service.core.errors import NotFoundError, StorageError


class KeyNotFoundError(NotFoundError):
    def __init__(self, key: str) -> None:
        super().__init__(f"{key} not found in storage")
        self.key = key


class Storage(abc.ABC):
    """What the service needs from a store. Writes of single keys are atomic."""

    uri: str
    # Uploads a publish runs at once: network stores gain from many, a local disk from one.
    upload_concurrency: int = 1

    @abc.abstractmethod
    def read(self, key: str) -> bytes:
        """The bytes at `key`; KeyNotFoundError if absent."""

    @abc.abstractmethod
    def read_tagged(self, key: str) -> tuple[bytes, str]:
        """The bytes at `key` and a tag that changes whenever they do (for conditional writes)."""

    @abc.abstractmethod
    def tag(self, key: str) -> str | None:
        """The current tag of `key` (None if absent), cheaper than reading it."""

    @abc.abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Write `data` at `key`, replacing it atomically."""

    @abc.abstractmethod
    def write_if(self, key: str, data: bytes, expected_tag: str | None) -> bool:
        """Write only if `key` still has `expected_tag` (None: only if absent). False if not."""

    @abc.abstractmethod
    def upload(self, key: str, path: Path) -> None:
        """Copy a local file to `key`."""

    @abc.abstractmethod
    def download(self, key: str, path: Path) -> None:
        """Copy `key` to a local file (the caller renames it into place)."""

    @abc.abstractmethod
    def copy(self, source: str, key: str) -> None:
        """Copy `source` to `key` inside the store (a new version reusing an older one's files)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """All keys under `prefix` (a folder-like prefix ending in '/'), sorted."""

    @abc.abstractmethod
    def list_folders(self, prefix: str) -> builtins.list[str]:
        """The names of the immediate sub-folders of `prefix`, sorted (one level, cheap)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete one key (nothing if it is not there)."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under `prefix`."""

    def delete_many(self, keys: builtins.list[str]) -> None:
        """Delete these keys (those not there are no error)."""
        for key in keys:
            self.delete(key)

    def local_path(self, key: str) -> Path | None:
        """A path to read `key` from without copying, where the store is a local folder."""
        return None

    def signed_url(self, key: str, expires_s: int, content_type: str | None = None) -> str | None:
        """A URL a client can GET `key` from directly, where the store offers one (answered with
        `content_type` when given)."""
        return None

    def as_bucket(self) -> SharedBucket | None:
        """The store as a bucket that clients and every instance reach directly, if it is one."""
        return self if isinstance(self, SharedBucket) else None


class SharedBucket(abc.ABC):
    """An optional ability of a store (a mixin, the way mlflow's artifact repositories expose
    theirs): a bucket that clients and every instance reach directly. Its objects have URIs, a
    client can upload a big zip straight into it, and a job on any instance reads that zip back.
    `Storage.as_bucket()` says whether a store has it (S3 does; a local folder does not)."""

    @abc.abstractmethod
    def uri_of(self, key: str) -> str:
        """The URI of a key, or of a folder-like prefix ending in '/'."""

    @abc.abstractmethod
    def bucket_key(self, uri: str) -> str | None:
        """The object key of a URI in this bucket; None for anything else."""

    @abc.abstractmethod
    def object_size(self, bucket_key: str) -> int:
        """Size of an object of the bucket (KeyNotFoundError if there is none)."""

    @abc.abstractmethod
    def download_object(self, bucket_key: str, path: Path, name: str | None = None) -> None:
        """Download an object of the bucket (`name`: the key as errors should call it)."""

    @abc.abstractmethod
    def signed_upload_url(self, key: str, expires_s: int) -> str:
        """A pre-signed PUT for `key`, so a large zip goes straight to the bucket."""

    @abc.abstractmethod
    def open_object(self, bucket_key: str, etag: str | None = None) -> BinaryIO:
        """A seekable file over ranged reads of an object (a zip read member by member); every
        read fails with StorageError once the object is no longer `etag` (default: as opened)."""


def check_key(key: str) -> str:
    """Refuse keys that could escape the store's root."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key {key!r}")
    return key
