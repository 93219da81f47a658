"""A sequence of changes answers what a fresh train of the final catalog answers; bad input on the
item routes publishes nothing."""

from __future__ import annotations

import json
from collections.abc import Callable

from flask import Flask
from flask.testing import FlaskClient

from tests.helpers import assert_error, make_zip, photo_jpeg, submit, upload

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "colorwheel", "moon")
QUERIES = PHOTOS + ("coins", "camera")


def answers(client: FlaskClient, **params: str) -> dict[str, list[tuple[str, str | None, dict]]]:
    """For each query photo: the (basename, label, metadata) of its top 8 results."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    out = {}
    for name in QUERIES:
        r = client.post(f"/food/infer?k=8&{query}", data=photo_jpeg(name), content_type="image/jpeg")
        assert r.status_code == 200, r.get_json()
        out[name] = [
            (m["name"].rsplit("/", 1)[-1], m["label"], m["metadata"]) for m in r.get_json()["results"]
        ]
    return out


def ids(client: FlaskClient) -> dict[str, int]:
    found = {}
    for name in QUERIES:
        body = client.post("/food/infer?k=1", data=photo_jpeg(name), content_type="image/jpeg").get_json()
        top = body["results"][0]
        found[top["name"].rsplit("/", 1)[-1].split(".")[0]] = top["id"]
    return found


def current(client: FlaskClient) -> str:
    return client.get("/food").get_json()["version"]


def test_sequence_matches_a_fresh_train(make_app: Callable[..., Flask]) -> None:
    app = make_app(keep_versions=50)
    client = app.test_client()
    submit(
        client, "/food/train", {"file": upload(make_zip({f"photos/{n}.jpg": photo_jpeg(n) for n in PHOTOS}))}
    )
    submit(client, "/food/items", {"file": upload(make_zip({"photos/coins.jpg": photo_jpeg("coins")}))})
    i = ids(client)
    assert client.delete(f"/food/items/{i['moon']}").status_code == 200
    r = client.patch(f"/food/items/{i['chelsea']}", json={"label": "cats", "metadata": {"a": 1}})
    assert r.status_code == 200, r.get_json()
    submit(client, "/food/items", {"file": upload(make_zip({"photos/camera.jpg": photo_jpeg("camera")}))})
    assert client.delete(f"/food/items/{i['coins']}").status_code == 200
    before = current(client)
    assert_error(client.delete(f"/food/items/{i['coins']}"), 404)  # twice: 404
    assert_error(client.patch(f"/food/items/{i['moon']}", json={"label": "x"}), 404)  # deleted
    assert_error(client.delete("/food/items", json={"ids": [i["astronaut"], i["moon"]]}), 404)
    assert current(client) == before  # nothing published

    changed = {
        "all": answers(client),
        "cats": answers(client, label="cats"),
        "where": answers(client, where=json.dumps({"a": 1})),
    }
    # and once compacted (every small segment merged)
    job = client.post("/food/compact")
    compacted = None
    if job.status_code == 202:
        compacted = answers(client)

    root = app.extensions["simsvc"].settings.cache_dir.parent
    fresh_app = make_app(keep_versions=50, storage_uri=f"file://{root / 'store2'}", cache_dir=root / "cache2")
    fresh = fresh_app.test_client()
    final = {
        f"photos/{n}.jpg": photo_jpeg(n) for n in ("astronaut", "coffee", "rocket", "colorwheel", "camera")
    }
    final["cats/chelsea.jpg"] = photo_jpeg("chelsea")
    zip_bytes = make_zip(
        {**final, "metadata.jsonl": json.dumps({"filename": "cats/chelsea.jpg", "a": 1}).encode() + b"\n"}
    )
    submit(fresh, "/food/train", {"file": upload(zip_bytes)})
    expected = {
        "all": answers(fresh),
        "cats": answers(fresh, label="cats"),
        "where": answers(fresh, where=json.dumps({"a": 1})),
    }
    for key in expected:
        for q in QUERIES:
            got = [(n, lb) for n, lb, _ in changed[key][q]]
            want = [(n, lb) for n, lb, _ in expected[key][q]]
            assert got == want, (key, q, got, want)
    if compacted is not None:
        assert compacted == changed["all"]
