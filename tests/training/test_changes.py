"""A catalogue that changes: stable ids, add/replace/delete/edit, reused vectors, races, read-your-writes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from bench import demo
from service.core.config import ROOT, Settings
from service.core.endpoint import parse_endpoint
from service.storage import open_storage, versions
from service.storage.blobs import BlobCache
from service.training import changes
from service.training import train as training
from service.training.base import read_base
from service.training.results import ChangeResult
from tests.helpers import make_zip, procfile_server, settings_for, submit, upload

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "colorwheel", "moon", "camera", "coins")


def photo_bytes(name: str, mirror: bool = False) -> bytes:
    image = demo.photo(name)
    if mirror:
        from PIL import ImageOps

        image = ImageOps.mirror(image)
    return demo.jpeg(image)


def catalogue_zip(names: tuple[str, ...] = PHOTOS, label: str = "photos", **extra: bytes) -> bytes:
    files = {f"{label}/{n}.jpg": photo_bytes(n) for n in names}
    return make_zip({**files, **extra})


def ids_by_name(client: FlaskClient, endpoint: str = "food") -> dict[str, int]:
    """Every item's id, by name, found by querying with each test photo."""
    found: dict[str, int] = {}
    for name in PHOTOS + ("page", "horse"):
        body = client.post(
            f"/{endpoint}/infer?k=50", data=photo_bytes(name), content_type="image/jpeg"
        ).get_json()
        for result in body.get("results", []):
            found[result["name"]] = result["id"]
    return found


def fetch(client: FlaskClient, path: str) -> tuple[int, bytes]:
    with client.get(path) as response:  # closes the file send_file opened
        return response.status_code, response.data


def top(client: FlaskClient, image: bytes, k: int = 1) -> list[dict[str, Any]]:
    response = client.post(f"/food/infer?k={k}", data=image, content_type="image/jpeg")
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"]


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


def test_an_add_embeds_only_the_new_images_which_are_then_found(app: Flask) -> None:
    client = app.test_client()
    first = submit(client, "/food/train", {"file": upload(catalogue_zip(PHOTOS[:6]))})
    assert first["counts"]["embedded"] == 6
    before = ids_by_name(client)

    added = submit(client, "/food/items", {"file": upload(catalogue_zip(PHOTOS[6:], label="more"))})
    assert added["kind"] == "add" and added["counts"]["embedded"] == 2  # only the two new images
    assert added["version"] > first["version"]
    # Served from the next request on (the job said "succeeded").
    assert client.get("/food").get_json()["version"] == added["version"]
    assert client.get("/food").get_json()["count"] == 8
    best = top(client, photo_bytes("coins"))[0]
    assert best["name"] == "more/coins.jpg" and best["score"] > 0.99
    after = ids_by_name(client)
    assert {n: after[n] for n in before} == before  # old items keep their ids
    assert after["more/coins.jpg"] not in before.values()


def test_images_sent_as_multipart_parts_are_added_with_their_fields(app: Flask) -> None:
    client = app.test_client()
    submit(client, "/food/train", {"file": upload(catalogue_zip(PHOTOS[:4]))})
    job = submit(
        client,
        "/food/items",
        {
            "image": [upload(photo_bytes("coins"), "coins.jpg"), upload(photo_bytes("camera"), "camera.jpg")],
            "label": "gear",
            "metadata": json.dumps({"price": 12}),
        },
    )
    assert job["counts"]["embedded"] == 2
    best = top(client, photo_bytes("camera"))[0]
    assert (best["name"], best["label"], best["metadata"]) == ("gear/camera.jpg", "gear", {"price": 12})
    bad = client.post(
        "/food/items", data={"image": [upload(photo_bytes("coins"), "c.jpg")], "metadata": "[1]"}
    )
    assert bad.status_code == 422 and "metadata" in bad.get_json()["errors"]


def test_a_replace_train_with_one_changed_image_embeds_one_image_and_keeps_ids(app: Flask) -> None:
    client = app.test_client()
    submit(client, "/food/train", {"file": upload(catalogue_zip())})
    before = ids_by_name(client)
    changed = {**{f"photos/{n}.jpg": photo_bytes(n) for n in PHOTOS}}
    changed["photos/moon.jpg"] = photo_bytes("moon", mirror=True)  # new bytes, same name
    job = submit(client, "/food/train", {"file": upload(make_zip(changed))})
    assert job["counts"]["embedded"] == 1 and job["counts"]["reused"] == len(PHOTOS) - 1
    assert ids_by_name(client) == before  # the same names, the same ids; moon's vector is new
    assert top(client, photo_bytes("moon", mirror=True))[0]["score"] > 0.99


def test_the_vector_cache_works_across_instances_sharing_one_bucket(
    tmp_path: Path, models_dir: Path, s3_config: dict[str, Any]
) -> None:
    spec = parse_endpoint(ROOT / "endpoints" / "food.toml")
    one = Settings.load(settings_for(tmp_path / "one", models_dir, **s3_config))
    two = Settings.load(settings_for(tmp_path / "two", models_dir, **s3_config))  # its own cache dir
    storage = open_storage(one.storage_uri, endpoint_url=one.s3_endpoint_url, region=one.s3_region)
    zips = tmp_path / "zips"
    zips.mkdir()
    (zips / "a.zip").write_bytes(catalogue_zip())
    first = training.train(spec, zips / "a.zip", storage, one)
    assert first.counts["embedded"] == len(PHOTOS)
    changed = {f"photos/{n}.jpg": photo_bytes(n) for n in PHOTOS}
    changed["photos/rocket.jpg"] = photo_bytes("rocket", mirror=True)
    (zips / "b.zip").write_bytes(make_zip(changed))
    second = training.train(spec, zips / "b.zip", storage, two)  # another instance, same bucket
    assert (second.counts["embedded"], second.counts["reused"]) == (1, len(PHOTOS) - 1)


def test_ids_stay_stable_and_deleted_items_disappear_everywhere(app: Flask) -> None:
    client = app.test_client()
    submit(client, "/food/train", {"file": upload(catalogue_zip())})
    ids = ids_by_name(client)
    gone = ids["photos/coffee.jpg"]

    response = client.delete(f"/food/items/{gone}")
    assert response.status_code == 200, response.get_json()
    change = response.get_json()
    assert (change["kind"], change["items"], change["count"]) == ("delete", [gone], len(PHOTOS) - 1)
    assert client.get("/food").get_json()["version"] == change["version"]
    assert client.get("/food").get_json()["count"] == len(PHOTOS) - 1
    for result in top(client, photo_bytes("coffee"), k=len(PHOTOS)):
        assert result["id"] != gone
    assert len(top(client, photo_bytes("coffee"), k=len(PHOTOS) - 1)) == len(PHOTOS) - 1  # still k
    other = ids["photos/rocket.jpg"]
    similar = client.get(f"/food/items/{other}/similar?k=20").get_json()["results"]
    assert gone not in [r["id"] for r in similar] and len(similar) == len(PHOTOS) - 2
    assert client.get(f"/food/items/{gone}/image").status_code == 404
    assert client.get(f"/food/items/{gone}/similar").status_code == 404
    remaining = {n: i for n, i in ids.items() if i != gone}
    assert ids_by_name(client) == remaining

    # Unknown ids (and names) are 404 and publish nothing.
    listed = client.get("/food/versions").get_json()
    assert client.delete(f"/food/items/{gone}").status_code == 404
    assert client.delete("/food/items", json={"ids": [other], "names": ["nope.jpg"]}).status_code == 404
    assert client.get("/food/versions").get_json() == listed
    # The batch form, by name and id.
    response = client.delete("/food/items", json={"names": ["photos/moon.jpg"], "ids": [other]})
    assert response.status_code == 200 and sorted(response.get_json()["items"]) == sorted(
        [ids["photos/moon.jpg"], other]
    )
    # An add after deletes: the old ids stay, new ones are new (a deleted id is never reused).
    submit(client, "/food/items", {"file": upload(make_zip({"photos/coffee.jpg": photo_bytes("coffee")}))})
    after = ids_by_name(client)
    assert after["photos/coffee.jpg"] not in ids.values()
    assert after["photos/astronaut.jpg"] == ids["photos/astronaut.jpg"]


def test_a_patch_changes_what_results_carry_and_nothing_else(app: Flask) -> None:
    client = app.test_client()
    submit(client, "/food/train", {"file": upload(catalogue_zip())})
    ids = ids_by_name(client)
    before = top(client, photo_bytes("chelsea"), k=5)
    cat = ids["photos/chelsea.jpg"]
    response = client.patch(f"/food/items/{cat}", json={"label": "cats", "metadata": {"colour": "ginger"}})
    assert response.status_code == 200, response.get_json()
    after = top(client, photo_bytes("chelsea"), k=5)
    assert [(r["id"], r["score"], r["name"]) for r in after] == [
        (r["id"], r["score"], r["name"]) for r in before
    ]
    assert (after[0]["label"], after[0]["metadata"]) == ("cats", {"colour": "ginger"})
    assert after[1:] == [{**r, "image_url": after[i + 1]["image_url"]} for i, r in enumerate(before[1:])]
    # A merge patch: null removes a field.
    client.patch(f"/food/items/{cat}", json={"metadata": {"colour": None, "size": "s"}})
    assert top(client, photo_bytes("chelsea"))[0]["metadata"] == {"size": "s"}
    assert client.patch("/food/items/999", json={"label": "x"}).status_code == 404
    assert client.patch(f"/food/items/{cat}", json={"label": 5}).status_code == 422
    same = client.patch(f"/food/items/{cat}", json={})  # RFC 7396: an empty patch changes nothing
    assert same.status_code == 200 and same.get_json()["version"] == client.get("/food").get_json()["version"]


def test_writes_need_the_training_tokens(make_app: Callable[..., Flask]) -> None:
    admin = "a" * 20
    client = make_app(admin_token=admin).test_client()
    assert client.delete("/food/items/1").status_code == 401
    assert client.patch("/food/items/1", json={"label": "x"}).status_code == 401
    response = client.post("/food/items", data={"file": upload(catalogue_zip(PHOTOS[:2]))})
    assert response.status_code == 401
    wrong = {"Authorization": "Bearer " + "b" * 20}
    assert client.delete("/food/items/1", headers=wrong).status_code == 403


@pytest.mark.slow  # concurrent adds, on both stores
@pytest.mark.parametrize("store", ["local", "s3"])
def test_four_concurrent_adds_all_end_up_in_the_catalogue(
    store: str, tmp_path: Path, models_dir: Path, request: pytest.FixtureRequest
) -> None:
    extra = request.getfixturevalue("s3_config") if store == "s3" else {}
    settings = Settings.load(settings_for(tmp_path, models_dir, **extra))
    storage = open_storage(
        settings.storage_uri, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
    )
    spec = parse_endpoint(ROOT / "endpoints" / "food.toml")
    base = tmp_path / "base.zip"
    base.write_bytes(catalogue_zip(PHOTOS[:2]))
    training.train(spec, base, storage, settings, fine_tune="never")
    sets = [PHOTOS[2:4], PHOTOS[4:6], PHOTOS[6:8], ("page", "horse")]
    paths = []
    for i, names in enumerate(sets):
        path = tmp_path / f"add{i}.zip"
        path.write_bytes(catalogue_zip(names, label=f"set{i}"))
        paths.append(path)
    barrier = threading.Barrier(len(paths))

    def add(path: Path) -> ChangeResult:
        barrier.wait()  # all four read the same base version
        return changes.add_items(spec, path, storage, settings)

    with ThreadPoolExecutor(len(paths)) as pool:
        results = list(pool.map(add, paths))
    assert sum(r.rebases for r in results) >= 1  # they did race
    final = versions.read_current(storage, "food").version
    base = read_base(storage, "food", BlobCache(storage, tmp_path / "reader"))
    assert base is not None and base.pointer.version == final
    live = [(s, int(r)) for s in base.view.segments for r in s.live()]
    names = {segment.names[row] for segment, row in live}
    expected = {f"photos/{n}.jpg" for n in PHOTOS[:2]}
    expected |= {f"set{i}/{n}.jpg" for i, s in enumerate(sets) for n in s}
    assert names == expected
    assert len({int(segment.items[row]) for segment, row in live}) == len(expected)  # every item its own id
    assert len(base.manifest.segments) == 5  # the train's, and one per add: nothing was copied


@pytest.mark.slow  # two instances
def test_a_worker_with_nothing_loaded_loads_a_new_version_before_answering(
    make_app: Callable[..., Flask], tmp_path: Path, models_dir: Path
) -> None:
    # This worker found no version, and its watcher would not look again for a minute.
    waiting = make_app(warm_on_start=False, watch_interval_s=60, cache_dir=tmp_path / "cache-a").test_client()
    assert waiting.post("/food/infer", data=photo_bytes("moon"), content_type="image/jpeg").status_code == 503
    # Another instance (its own cache folder: no note reaches this one) publishes a version.
    other = make_app(cache_dir=tmp_path / "cache-b").test_client()
    job = submit(other, "/food/train", {"file": upload(catalogue_zip(PHOTOS[:3]))})
    response = waiting.post("/food/infer", data=photo_bytes("moon"), content_type="image/jpeg")
    assert response.status_code == 200 and response.get_json()["version"] == job["version"]


@pytest.mark.slow
def test_a_job_that_says_succeeded_is_served_by_every_worker_at_once(
    tmp_path: Path, models_dir: Path
) -> None:
    env = {"WEB_CONCURRENCY": "2", "MODELS_DIR": str(models_dir), "WATCH_INTERVAL_S": "30"}
    with procfile_server(tmp_path, env) as server:
        for zip_bytes in (catalogue_zip(PHOTOS[:3]), catalogue_zip(PHOTOS[:5])):
            posted = requests.post(
                f"{server.url}/food/train", files={"file": ("z.zip", zip_bytes)}, timeout=30
            )
            assert posted.status_code == 202, posted.text
            deadline = time.monotonic() + 180
            while (job := requests.get(posted.json()["status_url"], timeout=10).json())["status"] not in (
                "succeeded",
                "failed",
            ):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert job["status"] == "succeeded", job

            def ask(_: int) -> tuple[int, str | None]:
                r = requests.post(
                    f"{server.url}/food/infer",
                    data=photo_bytes("coffee"),
                    headers={"Content-Type": "image/jpeg"},
                    timeout=60,
                )
                return r.status_code, r.json().get("version")

            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(ask, range(50)))
            assert answers == [(200, job["version"])] * 50
        assert len(server.workers()) == 2


def test_items_with_several_photos_come_back_once_with_the_photo_that_matched(app: Flask) -> None:
    client = app.test_client()
    files = {f"photos/{n}.jpg": photo_bytes(n) for n in PHOTOS}
    files["photos/astronaut-back.jpg"] = photo_bytes("astronaut", mirror=True)
    files["photos/coffee-top.jpg"] = photo_bytes("coffee", mirror=True)
    metadata = "filename,item,price\n"
    metadata += "photos/astronaut.jpg,suit,10\nphotos/astronaut-back.jpg,suit,10\n"
    metadata += "photos/coffee.jpg,mug,4\nphotos/coffee-top.jpg,mug,4\n"
    submit(client, "/food/train", {"file": upload(make_zip({**files, "metadata.csv": metadata.encode()}))})
    assert client.get("/food").get_json()["count"] == len(PHOTOS)  # 10 photos, 8 items

    results = top(client, photo_bytes("astronaut", mirror=True), k=len(PHOTOS))
    assert len(results) == len(PHOTOS) and len({r["id"] for r in results}) == len(PHOTOS)  # each once
    best = results[0]
    assert (best["name"], best["photo"], best["metadata"]) == (
        "suit",
        "photos/astronaut-back.jpg",
        {"price": "10"},
    )
    # The URL serves the photo that matched; the item's photos are numbered in the zip's order.
    assert fetch(client, best["image_url"].removeprefix("http://localhost")) == (200, files[best["photo"]])
    photos = sorted(["photos/astronaut.jpg", "photos/astronaut-back.jpg"])
    assert fetch(client, f"/food/items/{best['id']}/image") == (200, files[photos[0]])
    assert fetch(client, f"/food/items/{best['id']}/images/1") == (200, files[photos[1]])
    assert fetch(client, f"/food/items/{best['id']}/images/2")[0] == 404

    mug = next(r["id"] for r in results if r["name"] == "mug")
    similar = client.get(f"/food/items/{mug}/similar?k={len(PHOTOS)}").get_json()["results"]
    assert mug not in [r["id"] for r in similar] and len(similar) == len(PHOTOS) - 1
    # Deleting by the item's name removes all its photos; re-sending it replaces the whole item.
    assert client.delete("/food/items", json={"names": ["suit"]}).get_json()["count"] == len(PHOTOS) - 1
    assert all(r["name"] != "suit" for r in top(client, photo_bytes("astronaut"), k=len(PHOTOS) - 1))


def test_filters_never_return_deleted_items_and_count_grouped_items_once(app: Flask) -> None:
    client = app.test_client()
    files = {f"photos/{n}.jpg": photo_bytes(n) for n in PHOTOS}
    files["photos/coffee-top.jpg"] = photo_bytes("coffee", mirror=True)
    metadata = "filename,item,kind\nphotos/coffee.jpg,mug,cup\nphotos/coffee-top.jpg,mug,cup\n"
    metadata += "photos/moon.jpg,,space\nphotos/rocket.jpg,,space\nphotos/astronaut.jpg,,space\n"
    submit(client, "/food/train", {"file": upload(make_zip({**files, "metadata.csv": metadata.encode()}))})
    where = json.dumps({"kind": ["cup", "space"]})
    found = client.post(
        f"/food/infer?k=10&where={where}", data=photo_bytes("coffee"), content_type="image/jpeg"
    )
    names = [r["name"] for r in found.get_json()["results"]]
    assert sorted(names) == sorted(["mug", "photos/moon.jpg", "photos/rocket.jpg", "photos/astronaut.jpg"])
    rocket = next(r["id"] for r in found.get_json()["results"] if r["name"] == "photos/rocket.jpg")
    assert client.delete(f"/food/items/{rocket}").status_code == 200
    for path in (f"/food/infer?k=10&where={where}", "/food/infer?k=10&label=photos"):
        again = client.post(path, data=photo_bytes("rocket"), content_type="image/jpeg").get_json()["results"]
        assert rocket not in [r["id"] for r in again] and len({r["id"] for r in again}) == len(again)
    mug = next(r["id"] for r in found.get_json()["results"] if r["name"] == "mug")
    similar = client.get(f"/food/items/{mug}/similar?k=10&where={where}").get_json()["results"]
    assert sorted(r["name"] for r in similar) == ["photos/astronaut.jpg", "photos/moon.jpg"]


@pytest.mark.slow  # three trains of a head
def test_changes_on_a_fine_tuned_version_use_its_head_or_train_it_again(app: Flask, photos_zip: Path) -> None:
    client = app.test_client()
    first = submit(client, "/food/train", {"file": upload(photos_zip), "fine_tune": "always"})
    assert first["evaluation"]["kept"] == "fine_tuned"
    extra = {"extra/coins.jpg": photo_bytes("coins"), "extra/camera.jpg": photo_bytes("camera")}
    # A kept head: the new images go through the version's own head, so they are found as themselves.
    kept = submit(client, "/food/items", {"file": upload(make_zip(extra))})
    assert kept["counts"]["embedded"] == 2 and kept["evaluation"] == {}
    versions_listed = client.get("/food/versions").get_json()["versions"]
    assert versions_listed[-1]["fine_tuned"] is True
    best = top(client, photo_bytes("coins"))[0]
    assert best["name"] == "extra/coins.jpg" and best["score"] > 0.99
    # fine_tune=always on a change: the head is trained again from every item's stored vectors;
    # only the new image goes through the backbone.
    again = submit(
        client,
        "/food/items",
        {"file": upload(make_zip({"extra/page.jpg": photo_bytes("page")})), "fine_tune": "always"},
    )
    assert again["counts"]["embedded"] == 1 and again["evaluation"]["kept"] == "fine_tuned"
    assert top(client, photo_bytes("page"))[0]["name"] == "extra/page.jpg"


def test_ids_are_never_given_twice_even_after_a_rollback(app: Flask) -> None:
    client = app.test_client()
    first = submit(client, "/food/train", {"file": upload(catalogue_zip(PHOTOS[:3]))})
    added = submit(client, "/food/items", {"file": upload(make_zip({"x/coins.jpg": photo_bytes("coins")}))})
    coins = added["counts"]["items"]
    assert client.post("/food/rollback", json={"version": first["version"]}).status_code == 200
    # Served at once by this instance (no waiting for the watcher).
    assert client.get("/food").get_json()["version"] == first["version"]
    again = submit(client, "/food/items", {"file": upload(make_zip({"y/camera.jpg": photo_bytes("camera")}))})
    assert set(again["counts"]["items"]).isdisjoint(coins)


def test_bad_json_bodies_and_metadata_are_clear_422s(app: Flask) -> None:
    client = app.test_client()
    submit(client, "/food/train", {"file": upload(catalogue_zip(PHOTOS[:3]))})
    item = next(iter(ids_by_name(client).values()))
    deep = "[" * 5000 + "]" * 5000
    for method, path in (
        ("PATCH", f"/food/items/{item}"),
        ("DELETE", "/food/items"),
        ("POST", "/food/rollback"),
    ):
        response = client.open(path, method=method, data=deep, content_type="application/json")
        assert response.status_code == 422, (path, response.get_json())
    for value in ("NaN", "Infinity", "-Infinity"):
        body = '{"metadata": {"x": VALUE}}'.replace("VALUE", value)
        response = client.patch(f"/food/items/{item}", data=body, content_type="application/json")
        assert response.status_code == 422 and "NaN or Infinity" in response.get_json()["message"]
    huge = {"metadata": {"x": "y" * 70_000}}
    assert client.patch(f"/food/items/{item}", json=huge).status_code == 422
    both = {"image": [upload(photo_bytes("coins"), "c.jpg")], "name": "a/c.jpg", "label": "b"}
    assert client.post("/food/items", data=both).status_code == 422
    # Nothing was published by any of them, and every answer still is valid JSON.
    assert len(client.get("/food/versions").get_json()["versions"]) == 1
    json.loads(client.post("/food/infer", data=photo_bytes("moon"), content_type="image/jpeg").data)
