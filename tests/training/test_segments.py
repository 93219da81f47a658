"""A change costs what it changes: segments, deletion bitmaps and overlays; what a change uploads and
what an instance downloads; compaction; the vector cache; a train that rebases onto changes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.application.service import Service
from service.core.config import ROOT
from service.core.endpoint import parse_endpoint
from service.storage import Storage, versions
from service.storage.manifest import Manifest
from service.training import changes
from service.training import train as training
from service.training.results import Progress
from tests.helpers import make_zip, photo_jpeg, submit, upload

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "colorwheel", "moon")


def catalog_zip(names: tuple[str, ...] = PHOTOS, label: str = "photos") -> bytes:
    return make_zip({f"{label}/{n}.jpg": photo_jpeg(n) for n in names})


def manifest(service: Service, version: str) -> Manifest:
    return versions.read_manifest(service.storage, "food", version)


def ids(client: FlaskClient) -> dict[str, int]:
    """Every item's id by name (each test photo finds itself first)."""
    found = {}
    for name in PHOTOS + ("coins", "camera"):
        body = client.post("/food/infer?k=1", data=photo_jpeg(name), content_type="image/jpeg").get_json()
        found[body["results"][0]["name"]] = body["results"][0]["id"]
    return found


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(keep_versions=20)


def test_each_change_writes_only_what_it_changes(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    client, service = app.test_client(), app.extensions["simsvc"]
    trained = submit(client, "/food/train", {"file": upload(catalog_zip())})
    base = manifest(service, trained["version"])
    uploaded: list[str] = []
    real = service.storage.upload
    monkeypatch.setattr(service.storage, "upload", lambda key, path: (uploaded.append(key), real(key, path)))
    item = ids(client)["photos/moon.jpg"]

    edited = client.patch(f"/food/items/{item}", json={"metadata": {"price": 3}}).get_json()
    after = manifest(service, edited["version"])
    assert after.segments[0].files == base.segments[0].files  # the segment itself: untouched
    assert after.segments[0].overlay is not None and len(uploaded) == 1  # one small overlay
    assert after.segments[0].overlay.size < 1000 and after.encoder_model == base.encoder_model

    uploaded.clear()
    deleted = client.delete(f"/food/items/{item}").get_json()
    after = manifest(service, deleted["version"])
    assert after.segments[0].files == base.segments[0].files and after.segments[0].live == 5
    assert len(uploaded) == 1 and after.segments[0].deleted is not None  # a bitmap of 1 byte
    assert after.count == 5

    uploaded.clear()
    added = submit(client, "/food/items", {"file": upload(make_zip({"more/coins.jpg": photo_jpeg("coins")}))})
    after = manifest(service, added["version"])
    assert len(after.segments) == 2 and after.segments[0] == manifest(service, deleted["version"]).segments[0]
    new_files = {k for k in uploaded if "/blobs/" in k}
    assert len(new_files) == len(after.segments[1].files) + 1  # the new segment's parts and its image
    assert after.count == 6 and after.segments[1].rows == 1


def test_an_instance_downloads_only_the_blobs_a_change_adds(
    make_app: Callable[..., Flask], s3_config: dict[str, object]
) -> None:
    app = make_app(**s3_config, keep_versions=20)
    client, service = app.test_client(), app.extensions["simsvc"]
    submit(client, "/food/train", {"file": upload(catalog_zip())})
    client.post("/food/infer", data=photo_jpeg("moon"), content_type="image/jpeg")  # loaded: cache warm
    cached = {p.name for p in service.blobs.folder.rglob("*") if p.is_file()}
    item = ids(client)["photos/coffee.jpg"]
    client.patch(f"/food/items/{item}", json={"label": "drinks"})
    client.delete(f"/food/items/{ids(client)['photos/rocket.jpg']}")
    body = client.post("/food/infer?k=1", data=photo_jpeg("coffee"), content_type="image/jpeg").get_json()
    assert body["results"][0]["label"] == "drinks"
    fetched = {p.name for p in service.blobs.folder.rglob("*") if p.is_file()} - cached
    assert len([n for n in fetched if "." not in n]) == 2  # the overlay and the bitmap (no .lock, .used)


def test_compaction_merges_small_segments_in_a_job_and_answers_stay_the_same(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app(keep_versions=20, compact_max_segments=3)
    client, service = app.test_client(), app.extensions["simsvc"]
    submit(client, "/food/train", {"file": upload(catalog_zip(PHOTOS[:4]))})
    for name in ("moon", "colorwheel"):
        submit(client, "/food/items", {"file": upload(make_zip({f"more/{name}.jpg": photo_jpeg(name)}))})
    before = ids(client)
    assert client.post("/food/compact").status_code == 409  # three segments of 1-9 rows: not past the bound
    submit(client, "/food/items", {"file": upload(make_zip({"more/coins.jpg": photo_jpeg("coins")}))})
    # The fourth put that tier past COMPACT_MAX_SEGMENTS=3: a compaction was queued, and merged it.
    listed = wait_for(
        lambda: client.get("/food/versions").get_json()["versions"][-1]["change"] == "compact", client
    )
    current = manifest(service, listed["current"])
    assert len(current.segments) == 1 and current.change["segments_merged"] == 4 and current.rows == 7
    assert ids(client) == {**before, **{k: v for k, v in ids(client).items() if k not in before}}
    assert client.get("/food").get_json()["count"] == 7


def wait_for(done: Callable[[], bool], client: FlaskClient, timeout: float = 60) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, client.get("/food/versions").get_json()
        time.sleep(0.2)
    return client.get("/food/versions").get_json()


def test_a_compaction_drops_deleted_rows_and_carries_changes_made_while_it_ran(
    make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(keep_versions=20)
    client, service = app.test_client(), app.extensions["simsvc"]
    submit(client, "/food/train", {"file": upload(catalog_zip())})
    found = ids(client)
    client.delete(f"/food/items/{found['photos/moon.jpg']}")
    spec = service.specs["food"]
    from service.training import compaction

    real_prepare = compaction.Merge.prepare

    def prepare_then_change(merge: compaction.Merge, base, folder: Path) -> None:  # noqa: ANN001
        real_prepare(merge, base, folder)
        # While the merged segment is built, a delete and an edit land: the compaction keeps both.
        changes.delete_items(spec, service.storage, service.settings, [found["photos/rocket.jpg"]], [])
        changes.edit_item(spec, service.storage, service.settings, found["photos/coffee.jpg"], label="drinks")

    monkeypatch.setattr(compaction.Merge, "prepare", prepare_then_change)
    result = compaction.compact(spec, service.storage, service.settings, every_segment=True)
    assert result.kind == "compact"
    merged = manifest(service, result.version).segments
    assert len(merged) == 1 and merged[0].rows == 5 and merged[0].live == 4  # moon gone, rocket deleted
    service.endpoint("food").refresh(force=True)
    body = client.post("/food/infer?k=1", data=photo_jpeg("coffee"), content_type="image/jpeg").get_json()
    assert body["results"][0]["label"] == "drinks"
    assert "photos/rocket.jpg" not in ids(client)


def test_an_image_deleted_and_added_back_is_not_embedded_again(app: Flask) -> None:
    client = app.test_client()
    submit(client, "/food/train", {"file": upload(catalog_zip())})
    moon = ids(client)["photos/moon.jpg"]
    client.delete(f"/food/items/{moon}")
    again = submit(client, "/food/items", {"file": upload(make_zip({"back/moon.jpg": photo_jpeg("moon")}))})
    assert again["counts"]["embedded"] == 0 and again["counts"]["reused"] == 1
    twice = submit(
        client,
        "/food/items",
        {"file": upload(make_zip({"a/c.jpg": photo_jpeg("coins"), "b/c.jpg": photo_jpeg("coins")}))},
    )
    assert twice["counts"]["embedded"] == 1 and twice["counts"]["images"] == 2  # the same bytes, once


def test_a_train_applies_the_changes_published_while_it_ran(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    app = make_app(keep_versions=20)
    client, service = app.test_client(), app.extensions["simsvc"]
    submit(client, "/food/train", {"file": upload(catalog_zip())})
    found = ids(client)
    spec = parse_endpoint(ROOT / "endpoints" / "food.toml")
    storage: Storage = service.storage
    zip_path = tmp_path / "again.zip"
    zip_path.write_bytes(catalog_zip(PHOTOS[:5]))  # moon is not in it; the rest is
    made = []

    def meanwhile(progress: Progress) -> None:
        if progress.stage == "index" and not made:  # after the train read its base, before it publishes
            made.append(
                changes.delete_items(spec, storage, service.settings, [found["photos/astronaut.jpg"]], [])
            )
            made.append(
                changes.edit_item(spec, storage, service.settings, found["photos/coffee.jpg"], label="cups")
            )
            extra = tmp_path / "extra.zip"
            extra.write_bytes(
                make_zip({"new/coins.jpg": photo_jpeg("coins"), "photos/rocket.jpg": photo_jpeg("camera")})
            )
            made.append(changes.add_items(spec, extra, storage, service.settings))

    result = training.train(spec, zip_path, storage, service.settings, meanwhile, fine_tune="never")
    final = manifest(service, result.version)
    assert versions.read_current(storage, "food").version == result.version and final.base == made[-1].version
    service.endpoint("food").refresh(force=True)
    now = ids(client)
    assert "photos/astronaut.jpg" not in now  # deleted meanwhile: stays deleted
    assert "photos/moon.jpg" not in now  # not in the train's zip
    assert (
        now["photos/coffee.jpg"] == found["photos/coffee.jpg"] and "new/coins.jpg" in now
    )  # the add is kept
    coffee = client.post("/food/infer?k=1", data=photo_jpeg("coffee"), content_type="image/jpeg").get_json()
    assert coffee["results"][0]["label"] == "cups"  # the edit applies to the train's row
    rocket = client.post("/food/infer?k=1", data=photo_jpeg("rocket"), content_type="image/jpeg").get_json()
    assert rocket["results"][0]["name"] == "photos/rocket.jpg" and rocket["results"][0]["score"] > 0.999
    # ...the zip names rocket, so the train's image wins over the one the add put there


def test_a_blob_corrupt_in_the_cache_is_fetched_again(
    make_app: Callable[..., Flask], s3_config: dict[str, object]
) -> None:
    app = make_app(**s3_config)
    client = app.test_client()
    job = submit(client, "/food/train", {"file": upload(catalog_zip())})
    client.post("/food/infer", data=photo_jpeg("moon"), content_type="image/jpeg")  # downloaded, cached
    other = make_app(**s3_config, cache_dir=app.extensions["simsvc"].settings.cache_dir, warm_on_start=False)
    blob = next(
        p for p in app.extensions["simsvc"].blobs.folder.rglob("*") if p.is_file() and "." not in p.name
    )
    blob.write_bytes(b"rotten")
    answer = other.test_client().post("/food/infer?k=1", data=photo_jpeg("moon"), content_type="image/jpeg")
    assert answer.status_code == 200 and answer.get_json()["version"] == job["version"]
    assert blob.read_bytes() != b"rotten"


def test_a_full_blob_cache_is_a_clear_error_and_the_served_version_stays(
    make_app: Callable[..., Flask], s3_config: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    app = make_app(**s3_config, warm_on_start=False)
    client, service = app.test_client(), app.extensions["simsvc"]
    first = submit(client, "/food/train", {"file": upload(catalog_zip(PHOTOS[:3]))})
    client.post("/food/infer", data=photo_jpeg("moon"), content_type="image/jpeg")

    def full(key: str, path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    added = submit(client, "/food/items", {"file": upload(make_zip({"x/coins.jpg": photo_jpeg("coins")}))})
    monkeypatch.setattr(service.storage, "download", full)  # the new version's blobs cannot be fetched
    info = client.get("/food").get_json()
    assert info["version"] == first["version"] and "full" in info["error"], info
    assert client.get("/health").get_json()["problems"]["food"] == info["error"]
    answer = client.post("/food/infer", data=photo_jpeg("moon"), content_type="image/jpeg")
    assert answer.status_code == 200 and answer.get_json()["version"] == first["version"]
    monkeypatch.undo()  # the operator frees the disk: the next check loads the new version
    service.endpoint("food").refresh()
    assert client.get("/food").get_json()["version"] == added["version"]


def test_a_new_version_of_one_endpoint_evicts_no_blob_another_endpoint_serves(
    make_app: Callable[..., Flask], s3_config: dict[str, object]
) -> None:
    import os
    import time

    app = make_app(**s3_config, keep_versions=20)
    client, service = app.test_client(), app.extensions["simsvc"]
    for endpoint in ("food", "fashion"):
        submit(client, f"/{endpoint}/train", {"file": upload(catalog_zip(PHOTOS[:3]))})
        client.post(f"/{endpoint}/infer", data=photo_jpeg("moon"), content_type="image/jpeg")
    served = {ref.sha256 for ref in service.endpoint("fashion").current().manifest.blobs()}
    fetched = {path.name for path in service.blobs.folder.rglob("*") if path.name in served}
    assert fetched
    an_hour_ago = time.time() - 3600  # both served for an hour: past the eviction's age
    for path in service.blobs.folder.rglob("*"):
        if path.is_file():
            os.utime(path, (an_hour_ago, an_hour_ago))
    coffee = ids(client)["photos/coffee.jpg"]
    assert client.patch(f"/food/items/{coffee}", json={"label": "x"}).status_code == 200
    client.post("/food/infer", data=photo_jpeg("moon"), content_type="image/jpeg")  # food's new version
    cached = {path.name for path in service.blobs.folder.rglob("*") if path.is_file()}
    assert fetched <= cached


def test_metrics_show_segments_and_the_blob_cache(app: Flask) -> None:
    client = app.test_client()
    submit(client, "/food/train", {"file": upload(catalog_zip(PHOTOS[:2]))})
    submit(client, "/food/items", {"file": upload(make_zip({"x/coins.jpg": photo_jpeg("coins")}))})
    client.post("/food/infer", data=photo_jpeg("moon"), content_type="image/jpeg")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'simsvc_segments{endpoint="food"} 2.0' in text
    assert "simsvc_blob_cache_total" in text
