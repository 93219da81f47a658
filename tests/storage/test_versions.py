"""Publishing: the layout, CURRENT written last and compare-and-swapped, verified reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.core.errors import IntegrityError
from service.storage import versions
from service.storage.local import LocalStorage


def staged(tmp_path: Path, name: str = "stage") -> Path:
    folder = tmp_path / name
    (folder / "images").mkdir(parents=True)
    for file in (*versions.SERVING_FILES, "vectors.npy"):
        (folder / file).write_bytes(f"{name}:{file}".encode())
    (folder / "images" / "0.jpg").write_bytes(b"jpeg")
    return folder


@pytest.fixture
def store(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


def test_publish_writes_the_layout_and_points_current_at_it(store: LocalStorage, tmp_path: Path) -> None:
    manifest = versions.publish(
        store, "shop", "20260101T000000.000000Z-aaaaaa", staged(tmp_path), {"count": 1}
    )
    prefix = "shop/versions/20260101T000000.000000Z-aaaaaa/"
    assert sorted(store.list(prefix)) == sorted(
        prefix + f for f in (*versions.SERVING_FILES, "vectors.npy", "images/0.jpg", "manifest.json")
    )
    assert json.loads(store.read("shop/CURRENT")) == {"version": "20260101T000000.000000Z-aaaaaa"}
    assert set(manifest["files"]) == {*versions.SERVING_FILES, "vectors.npy", "images/0.jpg"}
    assert manifest["files"]["images/0.jpg"]["sha256"] == versions.sha256_file(
        tmp_path / "stage" / "images" / "0.jpg"
    )
    assert versions.list_versions(store, "shop") == ["20260101T000000.000000Z-aaaaaa"]


def test_a_failed_upload_leaves_current_alone(
    store: LocalStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    versions.publish(store, "shop", "20260101T000000.000000Z-aaaaaa", staged(tmp_path, "v1"), {})
    calls = []

    def failing_upload(key: str, path: Path) -> None:
        calls.append(key)
        if len(calls) == 3:
            raise OSError("disk full")
        LocalStorage.upload(store, key, path)

    monkeypatch.setattr(store, "upload", failing_upload)
    with pytest.raises(OSError, match="disk full"):
        versions.publish(store, "shop", "20260102T000000.000000Z-bbbbbb", staged(tmp_path, "v2"), {})
    assert versions.read_current(store, "shop").version == "20260101T000000.000000Z-aaaaaa"
    assert versions.list_versions(store, "shop") == ["20260101T000000.000000Z-aaaaaa"]  # no manifest


def test_an_older_build_cannot_replace_a_newer_version(store: LocalStorage, tmp_path: Path) -> None:
    versions.publish(store, "shop", "20260105T000000.000000Z-bbbbbb", staged(tmp_path, "new"), {})
    with pytest.raises(versions.SupersededError, match="superseded by 20260105T000000.000000Z-bbbbbb"):
        versions.publish(store, "shop", "20260101T000000.000000Z-aaaaaa", staged(tmp_path, "old"), {})
    assert versions.read_current(store, "shop").version == "20260105T000000.000000Z-bbbbbb"


def test_fetch_checks_every_serving_file(store: LocalStorage, tmp_path: Path) -> None:
    version = "20260101T000000.000000Z-aaaaaa"
    manifest = versions.publish(store, "shop", version, staged(tmp_path), {})
    folder = versions.fetch_serving_files(store, "shop", version, manifest, tmp_path / "cache")
    assert (folder / "index.ann").read_bytes() == b"stage:index.ann"

    store.write(f"shop/versions/{version}/ids.json", b"tampered")
    with pytest.raises(IntegrityError, match="ids.json has sha256"):
        versions.fetch_serving_files(store, "shop", version, manifest, tmp_path / "cache")


def test_version_ids_sort_by_creation_time() -> None:
    from datetime import UTC, datetime

    early = versions.new_version_id(datetime(2026, 1, 1, tzinfo=UTC))
    late = versions.new_version_id(datetime(2026, 1, 2, tzinfo=UTC))
    assert early < late
    assert versions.SAFE_VERSION.match(early)
