"""Storage: one contract, run against the local folder and against S3 over real HTTP (moto server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests

from service.core.errors import StorageError
from service.storage import KeyNotFoundError, Storage, open_storage
from service.storage.local import LocalStorage
from service.storage.s3 import S3Storage
from tests.helpers import S3Server


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "root")
    server: S3Server = request.getfixturevalue("s3_server")
    return open_storage(f"s3://{server.bucket()}/some/prefix", endpoint_url=server.url)


def test_write_then_read(store: Storage) -> None:
    store.write("a/b/c.json", b"{}")
    assert store.read("a/b/c.json") == b"{}"
    assert store.exists("a/b/c.json") and not store.exists("a/b/d.json")


def test_missing_keys_raise_key_not_found(store: Storage) -> None:
    with pytest.raises(KeyNotFoundError):
        store.read("nope")
    with pytest.raises(KeyNotFoundError):
        store.download("nope", Path(os.devnull))
    assert store.tag("nope") is None


def test_write_if_is_a_compare_and_swap(store: Storage) -> None:
    assert store.write_if("CURRENT", b"v1", expected_tag=None)
    assert not store.write_if("CURRENT", b"v2", expected_tag=None)  # exists now
    _, tag = store.read_tagged("CURRENT")
    assert store.tag("CURRENT") == tag
    assert store.write_if("CURRENT", b"v2", expected_tag=tag)
    assert not store.write_if("CURRENT", b"v3", expected_tag=tag)  # stale tag
    assert store.read("CURRENT") == b"v2"
    assert store.tag("CURRENT") != tag


def test_list_folders_and_delete_prefix(store: Storage) -> None:
    for key in ("e/versions/1/a", "e/versions/1/b", "e/versions/2/a", "e/CURRENT"):
        store.write(key, b"x")
    assert store.list("e/versions/") == ["e/versions/1/a", "e/versions/1/b", "e/versions/2/a"]
    assert store.list_folders("e/versions/") == ["1", "2"]
    assert store.list_folders("e/") == ["versions"]
    store.delete_prefix("e/versions/1/")
    assert store.list("e/versions/") == ["e/versions/2/a"]
    assert store.list("nothing/") == [] and store.list_folders("nothing/") == []


def test_upload_and_download_large_files(store: Storage, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(20 * 1024 * 1024 + 7))  # over the multipart threshold on S3
    store.upload("x/big.bin", source)
    store.download("x/big.bin", tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()


@pytest.mark.parametrize("key", ["../escape", "/abs", "a/../../b", "a//b", ""])
def test_keys_cannot_escape_the_root(store: Storage, key: str) -> None:
    with pytest.raises(StorageError, match="invalid storage key"):
        store.write(key, b"x")


def test_local_paths_and_signed_urls(store: Storage) -> None:
    store.write("img/0.jpg", b"jpeg bytes")
    if isinstance(store, LocalStorage):
        assert store.local_path("img/0.jpg") == store.root / "img" / "0.jpg"
        assert store.signed_url("img/0.jpg", 60) is None
    else:
        assert store.local_path("img/0.jpg") is None
        url = store.signed_url("img/0.jpg", 60)
        assert url and "X-Amz-Signature" in url
        assert requests.get(url, timeout=10).content == b"jpeg bytes"


def test_storage_is_chosen_by_uri(tmp_path: Path) -> None:
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    s3 = open_storage("s3://bucket/a/prefix/", region="eu-west-1")
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix, s3.region, s3.uri) == (
        "bucket",
        "a/prefix",
        "eu-west-1",
        "s3://bucket/a/prefix",
    )
    with pytest.raises(ValueError, match="unsupported STORAGE_URI scheme"):
        open_storage("ftp://host/x")
    with pytest.raises(ValueError, match="needs a bucket"):
        open_storage("s3:///prefix")


def test_an_unreachable_s3_is_a_storage_error(tmp_path: Path) -> None:
    from tests.helpers import free_port

    store = open_storage("s3://bucket/p", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match="S3 read of s3://bucket/p/CURRENT failed"):
        store.read("CURRENT")
    with pytest.raises(StorageError):
        store.tag("CURRENT")


def test_a_file_uri_with_a_host_part_is_refused() -> None:
    with pytest.raises(ValueError, match="needs an absolute path"):
        open_storage("file://data")
