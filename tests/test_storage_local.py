"""Local storage: atomic writes, compare-and-swap, listing, and keys that cannot escape the root."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import StorageError
from service.storage import KeyNotFoundError, open_storage
from service.storage.local import LocalStorage


@pytest.fixture
def store(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "root")


def test_write_then_read(store: LocalStorage) -> None:
    store.write("a/b/c.json", b"{}")
    assert store.read("a/b/c.json") == b"{}"
    assert store.exists("a/b/c.json") and not store.exists("a/b/d.json")


def test_missing_keys_raise_key_not_found(store: LocalStorage) -> None:
    with pytest.raises(KeyNotFoundError):
        store.read("nope")
    assert store.tag("nope") is None


def test_write_if_is_a_compare_and_swap(store: LocalStorage) -> None:
    assert store.write_if("CURRENT", b"v1", expected_tag=None)
    assert not store.write_if("CURRENT", b"v2", expected_tag=None)  # exists now
    _, tag = store.read_tagged("CURRENT")
    assert store.write_if("CURRENT", b"v2", expected_tag=tag)
    assert not store.write_if("CURRENT", b"v3", expected_tag=tag)  # stale tag
    assert store.read("CURRENT") == b"v2"


def test_list_and_delete_prefix(store: LocalStorage, tmp_path: Path) -> None:
    for key in ("e/versions/1/a", "e/versions/1/b", "e/versions/2/a", "e/CURRENT"):
        store.write(key, b"x")
    assert store.list("e/versions/") == ["e/versions/1/a", "e/versions/1/b", "e/versions/2/a"]
    store.delete_prefix("e/versions/1/")
    assert store.list("e/versions/") == ["e/versions/2/a"]


def test_upload_download_and_local_path(store: LocalStorage, tmp_path: Path) -> None:
    source = tmp_path / "file.bin"
    source.write_bytes(b"abc")
    store.upload("x/file.bin", source)
    store.download("x/file.bin", tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == b"abc"
    assert store.local_path("x/file.bin") == store.root / "x" / "file.bin"


@pytest.mark.parametrize("key", ["../escape", "/abs", "a/../../b", "a//b", ""])
def test_keys_cannot_escape_the_root(store: LocalStorage, key: str) -> None:
    with pytest.raises(StorageError, match="invalid storage key"):
        store.write(key, b"x")


def test_storage_is_chosen_by_uri(tmp_path: Path) -> None:
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    with pytest.raises(ValueError, match="unsupported STORAGE_URI scheme"):
        open_storage("ftp://host/x")
