"""Publishing: manifests of content-addressed blobs, CURRENT written last and compare-and-swapped,
only new blobs uploaded, trains superseded or rebased, retention, rollback, format-1 versions read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.core.errors import ConflictError, IntegrityError, NotFoundError
from service.storage import manifest as manifests
from service.storage import versions
from service.storage.local import LocalStorage
from service.storage.manifest import Manifest, SegmentRef, blob_key
from tests.helpers import files, manifest_of


@pytest.fixture
def store(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


def publish(
    store: LocalStorage,
    tmp_path: Path,
    version: str,
    tag: str,
    lineage: str | None = None,
    change: bool = False,
) -> Manifest:
    parts = files(tmp_path / tag, tag)
    manifest = manifest_of(version, parts, lineage)
    base = versions.read_current(store, "shop")
    versions.publish(store, manifest, parts.values(), set(), base=base, change=change)
    return manifest


V1, V2, V3 = (f"2026010{d}T000000.000000Z-aaaaa{d}" for d in (1, 2, 3))


def test_publish_uploads_blobs_then_the_manifest_then_current(store: LocalStorage, tmp_path: Path) -> None:
    manifest = publish(store, tmp_path, V1, "one")
    assert json.loads(store.read("shop/CURRENT")) == {"version": V1}
    assert versions.read_manifest(store, "shop", V1) == manifest  # parsed back, typed, the same
    for ref in manifest.blobs():
        assert store.read(blob_key("shop", ref.sha256)).startswith(b"one:")
    assert versions.list_versions(store, "shop") == [V1]
    assert store.list("shop/manifests/") == [f"shop/manifests/{V1}.json"]


def test_blobs_the_base_holds_are_not_uploaded_again(
    store: LocalStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = publish(store, tmp_path, V1, "one")
    uploaded: list[str] = []
    monkeypatch.setattr(store, "upload", lambda key, path: uploaded.append(key))
    parts = files(tmp_path / "two", "one")  # the same bytes
    parts["overlay"] = files(tmp_path / "extra", "two")["names"]
    manifest = manifest_of(V2, parts)
    known = {ref.sha256 for ref in first.blobs()}
    versions.publish(
        store, manifest, parts.values(), known, base=versions.read_current(store, "shop"), change=True
    )
    assert uploaded == [blob_key("shop", parts["overlay"][1].sha256)]  # only what is new


def test_a_failed_upload_leaves_current_alone(
    store: LocalStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(store, tmp_path, V1, "one")

    def failing_upload(key: str, path: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store, "upload", failing_upload)
    with pytest.raises(OSError, match="disk full"):
        publish(store, tmp_path, V2, "two")
    assert versions.read_current(store, "shop").version == V1
    assert versions.list_versions(store, "shop") == [V1]  # no manifest was written


def test_an_older_train_cannot_replace_a_newer_one(store: LocalStorage, tmp_path: Path) -> None:
    publish(store, tmp_path, V2, "new")
    parts = files(tmp_path / "old", "old")
    with pytest.raises(versions.SupersededError, match=f"superseded by {V2}"):
        versions.publish(
            store,
            manifest_of(V1, parts),
            parts.values(),
            set(),
            base=versions.Pointer(None, None),
            change=False,
        )
    assert versions.read_current(store, "shop").version == V2


def test_a_change_built_on_an_old_base_must_rebase(store: LocalStorage, tmp_path: Path) -> None:
    publish(store, tmp_path, V1, "one")
    stale = versions.read_current(store, "shop")
    publish(store, tmp_path, V2, "two", lineage=V1, change=True)
    parts = files(tmp_path / "three", "three")
    with pytest.raises(versions.RebaseError):
        versions.publish(store, manifest_of(V3, parts, V1), parts.values(), set(), base=stale, change=True)


def test_a_train_whose_catalog_changed_meanwhile_rebases_rather_than_drops_the_change(
    store: LocalStorage, tmp_path: Path
) -> None:
    publish(store, tmp_path, V1, "one")
    base = versions.read_current(store, "shop")  # the train starts on V1
    publish(store, tmp_path, V2, "change", lineage=V1, change=True)  # a change lands meanwhile
    parts = files(tmp_path / "train", "train")
    with pytest.raises(versions.RebaseError, match="changed while this train ran"):
        versions.publish(store, manifest_of(V3, parts), parts.values(), set(), base=base, change=False)
    assert versions.read_current(store, "shop").version == V2


def test_retention_rollback_and_delete(store: LocalStorage, tmp_path: Path) -> None:
    one = publish(store, tmp_path, V1, "one")
    publish(store, tmp_path, V2, "two")
    publish(store, tmp_path, V3, "three")
    assert versions.rollback(store, "shop", V1) == one
    assert versions.read_current(store, "shop").version == V1
    with pytest.raises(ConflictError):
        versions.delete_version(store, "shop", V1)  # the current one
    assert versions.delete_version(store, "shop", V2).version == V2
    pruned = versions.prune_versions(store, "shop", keep=1)
    assert [m.version for m in pruned] == [] and versions.list_versions(store, "shop") == [V1, V3]
    versions.rollback(store, "shop", V3)
    assert [m.version for m in versions.prune_versions(store, "shop", keep=1)] == [V1]
    with pytest.raises(NotFoundError):
        versions.rollback(store, "shop", V1)


def test_a_manifest_that_is_not_one_is_refused(store: LocalStorage, tmp_path: Path) -> None:
    publish(store, tmp_path, V1, "one")
    store.write(versions.manifest_key("shop", V1), b'{"format": 2, "endpoint": "shop"}')
    with pytest.raises(IntegrityError, match="version is missing|names another version"):
        versions.read_manifest(store, "shop", V1)
    store.write(versions.manifest_key("shop", V1), b"[1, 2]")
    with pytest.raises(IntegrityError):
        versions.read_manifest(store, "shop", V1)


def test_a_format_1_version_is_read_as_one_segment_with_its_files_keys(store: LocalStorage) -> None:
    prefix = f"shop/versions/{V1}/"
    legacy = {"index.ann": "a" * 64, "ids.json": "b" * 64, "metadata.json": "c" * 64, "rows.npy": "d" * 64}
    raw = {"count": 3, "rows": 4, "dim": 2, "encoder": {"fingerprint": "f"}, "next_id": 5,
           "files": {name: {"sha256": sha, "size": 1} for name, sha in legacy.items()}}  # fmt: skip
    store.write(prefix + "manifest.json", json.dumps(raw).encode())
    read = versions.read_manifest(store, "shop", V1)
    assert read.format == 1 and read.count == 3 and read.rows == 4 and len(read.segments) == 1
    segment = read.segments[0]
    assert (
        segment.files["index"].key == prefix + "index.ann"
        and segment.files["items"].key == prefix + "rows.npy"
    )
    assert segment.image_key("shop", "images/ab.jpg") == prefix + "images/ab.jpg"
    assert versions.list_versions(store, "shop") == [V1]


def test_a_format_2_segment_names_its_images_by_content() -> None:
    segment = SegmentRef("s", 1, 1, {})
    assert segment.image_key("shop", "images/" + "e" * 64 + ".jpg") == "shop/blobs/ee/" + "e" * 64
    assert manifests.blob_key("shop", "e" * 64) == "shop/blobs/ee/" + "e" * 64


def test_version_ids_sort_by_creation_time() -> None:
    from datetime import UTC, datetime

    early = versions.new_version_id(datetime(2026, 1, 1, tzinfo=UTC))
    late = versions.new_version_id(datetime(2026, 1, 2, tzinfo=UTC))
    assert early < late
    assert versions.SAFE_VERSION.match(early)
