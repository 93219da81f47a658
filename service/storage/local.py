"""Local-filesystem storage: the embedded default for one machine (e.g. ./data)."""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.storage.base import KeyNotFoundError, Storage, check_key


class LocalStorage(Storage):
    """Keys are files under `root`; every write goes to a temporary file renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise KeyNotFoundError(key) from None

    def read_tagged(self, key: str) -> tuple[bytes, str]:
        data = self.read(key)
        return data, _digest(data)

    def tag(self, key: str) -> str | None:
        try:
            return _digest(self._path(key).read_bytes())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def write(self, key: str, data: bytes) -> None:
        with self._atomic(key) as tmp:
            tmp.write_bytes(data)

    def write_if(self, key: str, data: bytes, expected_tag: str | None) -> bool:
        # An advisory lock beside the key makes compare-and-swap atomic across processes.
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.tag(key) != expected_tag:
                return False
            self.write(key, data)
            return True

    def upload(self, key: str, path: Path) -> None:
        target = self._path(key)
        # A hard link when the file is on the same filesystem: publishing a version of many
        # thousands of images then copies nothing. A link appears whole, so a new key (every file
        # of a version is new) is linked straight into place; the staged file is never rewritten.
        for _ in range(2):
            try:
                os.link(path, target)
                return
            except FileNotFoundError:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError:  # the key exists, or another filesystem: copy and rename
                break
        with self._atomic(key) as tmp:
            shutil.copyfile(path, tmp)

    def copy(self, source: str, key: str) -> None:
        # Version files are immutable, so a hard link is a copy that costs nothing.
        path = self._path(source)
        if not path.is_file():
            raise KeyNotFoundError(source)
        self.upload(key, path)

    def download(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise KeyNotFoundError(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix.rstrip("/") if prefix else self.root
        if not base.is_dir():
            return []
        keys = (
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.endswith((".lock", ".tmp"))
        )
        return sorted(keys)

    def list_folders(self, prefix: str) -> builtins.list[str]:
        base = self.root / prefix.rstrip("/") if prefix else self.root
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix.rstrip("/")), ignore_errors=True)

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        return path if path.is_file() else None

    @contextmanager
    def _atomic(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
