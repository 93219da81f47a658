"""The service on S3 over real HTTP (moto's server): publish, cold start, races, outages, tampering,
retention and rollback."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from bench import demo
from service.storage import open_storage, versions
from service.storage.manifest import blob_key
from tests.helpers import S3Server, cli, make_zip, train, upload, wait_job, wait_serving
from tests.storage.test_versions import files, manifest_of


def jpeg(name: str) -> bytes:
    return demo.jpeg(demo.photo(name))


def infer(client: FlaskClient, name: str = "coffee", k: int = 3) -> Any:
    return client.post(f"/food/infer?k={k}", data=jpeg(name), content_type="image/jpeg")


@pytest.fixture
def private_s3() -> Iterator[S3Server]:
    """An S3 server of this test's own, which the test may stop and start again."""
    server = S3Server()
    server.start()
    yield server
    try:
        server.stop()
    except Exception:
        pass  # already stopped by the test


def s3_app(
    make_app: Callable[..., Flask],
    server: S3Server,
    bucket: str,
    tmp_path: Path,
    cache: str = "cache",
    **extra: Any,
) -> Flask:
    return make_app(
        storage_uri=f"s3://{bucket}/simsvc", s3_endpoint_url=server.url, cache_dir=tmp_path / cache, **extra
    )


def serving_on(
    server: S3Server, make_app: Callable[..., Flask], tmp_path: Path, photos_zip: Path
) -> tuple[FlaskClient, str, dict[str, Any]]:
    """An app on a fresh bucket of `server`, trained on the photos and serving that version."""
    bucket = server.bucket()
    client = s3_app(make_app, server, bucket, tmp_path).test_client()
    first = train(client, "food", photos_zip)
    wait_serving(client, "food", first["version"])
    return client, bucket, first


def test_train_publish_infer_through_s3_and_a_cold_instance(
    make_app: Callable[..., Flask], s3_server: S3Server, photos_zip: Path, tmp_path: Path
) -> None:
    bucket = s3_server.bucket()
    first = s3_app(make_app, s3_server, bucket, tmp_path, "instance-a").test_client()
    job = train(first, "food", photos_zip)
    assert job["status"] == "succeeded", job
    wait_serving(first, "food", job["version"])

    listed = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = {o["Key"] for page in listed for o in page.get("Contents", [])}
    store = open_storage(f"s3://{bucket}/simsvc", endpoint_url=s3_server.url)
    manifest = versions.read_manifest(store, "food", job["version"])
    assert f"simsvc/food/manifests/{job['version']}.json" in keys
    for ref in manifest.blobs():  # every file of the version: a blob named by its content
        assert f"simsvc/{blob_key('food', ref.sha256)}" in keys
    with zipfile.ZipFile(photos_zip) as zf:  # and every image, once
        images = {hashlib.sha256(zf.read(n)).hexdigest() for n in zf.namelist() if n.endswith(".jpg")}
    assert len(images) == 30 and all(f"simsvc/{blob_key('food', sha)}" in keys for sha in images)
    assert "simsvc/food/CURRENT" in keys and f"simsvc/jobs/{job['id']}.json" in keys

    body = infer(first).get_json()
    best = body["results"][0]
    assert best["name"] == "coffee/coffee-original.jpg" and best["score"] >= 0.99
    # Image URLs are pre-signed GETs straight from S3, and return the original bytes.
    assert "X-Amz-Signature" in best["image_url"]
    image = requests.get(best["image_url"], timeout=10)
    assert image.status_code == 200 and image.content[:2] == b"\xff\xd8"
    redirect = first.get(f"/food/items/{best['id']}/image")
    assert redirect.status_code == 302 and "X-Amz-Signature" in redirect.headers["Location"]

    # A new instance with an empty disk downloads the current version once and serves it.
    cold = s3_app(make_app, s3_server, bucket, tmp_path, "instance-b").test_client()
    cold_body = infer(cold).get_json()
    assert cold_body["version"] == job["version"]
    assert [r["id"] for r in cold_body["results"]] == [r["id"] for r in body["results"]]
    vectors = manifest.segments[0].files["vectors"].sha256
    cached = tmp_path / "instance-b" / "blobs" / "food" / vectors[:2] / vectors
    assert cached.is_file()
    before = cached.stat()

    # A second worker on that instance reuses the downloaded files instead of fetching them.
    second_worker = s3_app(make_app, s3_server, bucket, tmp_path, "instance-b").test_client()
    assert infer(second_worker).get_json()["version"] == job["version"]
    assert cached.stat().st_ino == before.st_ino  # the same file (a download would replace it)


def test_racing_publishes_leave_one_complete_current(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.bucket()
    names = sorted(versions.new_version_id() for _ in range(4))
    barrier = threading.Barrier(len(names))
    outcomes: dict[str, str] = {}

    def publisher(name: str) -> None:
        store = open_storage(f"s3://{bucket}/race", endpoint_url=s3_server.url)  # one per "instance"
        parts = files(tmp_path / name, name)
        barrier.wait()
        try:
            versions.publish(
                store,
                manifest_of(name, parts),
                parts.values(),
                set(),
                base=versions.Pointer(None, None),
                change=False,
            )
            outcomes[name] = "published"
        except versions.SupersededError:
            outcomes[name] = "superseded"

    threads = [threading.Thread(target=publisher, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    store = open_storage(f"s3://{bucket}/race", endpoint_url=s3_server.url)
    current = versions.read_current(store, "shop").version
    assert current == max(names), "the newest build wins, whatever order they finished in"
    assert outcomes[current] == "published" and set(outcomes) == set(names)
    manifest = versions.read_manifest(store, "shop", current)
    for ref in manifest.blobs():
        assert store.read(blob_key("shop", ref.sha256)).startswith(current.encode())


def test_serving_survives_an_s3_outage_and_then_picks_up_a_newer_version(
    make_app: Callable[..., Flask], private_s3: S3Server, photos_zip: Path, tmp_path: Path
) -> None:
    client, bucket, first = serving_on(private_s3, make_app, tmp_path, photos_zip)

    private_s3.stop()
    assert infer(client).status_code == 200
    deadline = time.monotonic() + 30
    while not (info := client.get("/food").get_json())["degraded"]:
        assert time.monotonic() < deadline, info
        time.sleep(0.1)
    assert info["degraded_since"] and info["status"] == "ready" and "S3" in info["error"]
    response = infer(client)
    assert response.status_code == 200 and response.get_json()["version"] == first["version"]

    private_s3.start()  # same port, same buckets
    second = train(client, "food", make_zip({"coffee/c.jpg": jpeg("coffee")}))
    assert second["status"] == "succeeded", second
    wait_serving(client, "food", second["version"])
    info = client.get("/food").get_json()
    assert info["degraded"] is False and info["degraded_since"] is None
    assert infer(client).get_json()["version"] == second["version"]


def test_an_s3_outage_during_training_fails_the_job_and_keeps_current(
    make_app: Callable[..., Flask], private_s3: S3Server, photos_zip: Path, tmp_path: Path
) -> None:
    client, bucket, first = serving_on(private_s3, make_app, tmp_path, photos_zip)

    response = client.post("/food/train", data={"file": upload(photos_zip)})
    assert response.status_code == 202
    private_s3.stop()  # the job is queued or running: everything it writes from now on fails
    job = wait_job(client, response.get_json()["status_url"])  # answered from this worker's memory
    assert job["status"] == "failed"
    assert "S3" in job["error"] and "failed" in job["error"]
    assert infer(client).get_json()["version"] == first["version"]

    private_s3.start()
    store = open_storage(f"s3://{bucket}/simsvc", endpoint_url=private_s3.url)
    assert versions.read_current(store, "food").version == first["version"]
    assert versions.list_versions(store, "food") == [first["version"]]
    # Once S3 is back, the failure is stored where every worker can read it.
    deadline = time.monotonic() + 60
    while True:
        try:
            stored = json.loads(store.read(f"jobs/{job['id']}.json"))
            if stored["status"] == "failed":
                break
        except Exception:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert stored["error"] == job["error"]


def test_a_tampered_version_is_refused_and_the_old_one_keeps_serving(
    make_app: Callable[..., Flask], s3_server: S3Server, photos_zip: Path, tmp_path: Path
) -> None:
    bucket = s3_server.bucket()
    # No background watcher: the test decides when the worker looks at CURRENT.
    app = s3_app(make_app, s3_server, bucket, tmp_path, warm_on_start=False)
    client, registry = app.test_client(), app.extensions["simsvc"].registry
    first = train(client, "food", photos_zip)
    assert infer(client).get_json()["version"] == first["version"]

    second = train(client, "food", make_zip({"moon/m.jpg": jpeg("moon")}))
    assert second["status"] == "succeeded"
    store = open_storage(f"s3://{bucket}/simsvc", endpoint_url=s3_server.url)
    vectors = versions.read_manifest(store, "food", second["version"]).segments[0].files["vectors"].sha256
    key = f"simsvc/{blob_key('food', vectors)}"
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"not the vectors that were published")

    registry.refresh_all()
    info = client.get("/food").get_json()
    assert info["version"] == first["version"]
    assert "vectors" in info["error"] and "does not match its sha256" in info["error"]
    assert infer(client).get_json()["version"] == first["version"]
    cache = tmp_path / "cache" / "blobs" / "food" / vectors[:2]
    assert not (cache / vectors).exists() and not list(cache.glob("*.part"))


def test_old_versions_are_pruned_and_can_be_rolled_back_to(
    make_app: Callable[..., Flask], s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = s3_server.bucket()
    client = s3_app(make_app, s3_server, bucket, tmp_path, keep_versions=2).test_client()
    made = []
    for name in ("moon", "coffee", "rocket"):
        job = train(client, "food", make_zip({f"{name}/{name}.jpg": jpeg(name)}))
        assert job["status"] == "succeeded"
        made.append(job["version"])
    store = open_storage(f"s3://{bucket}/simsvc", endpoint_url=s3_server.url)
    assert versions.list_versions(store, "food") == made[1:]
    wait_serving(client, "food", made[2])

    env = {
        **os.environ,
        "STORAGE_URI": f"s3://{bucket}/simsvc",
        "S3_ENDPOINT_URL": s3_server.url,
        "CACHE_DIR": str(tmp_path / "cli-cache"),
    }
    listed = cli("versions", "list", "food", env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()[1:]
    assert [line.split()[-3] for line in lines] == made[1:]
    assert lines[-1].startswith("*") and not lines[0].startswith("*")

    rolled = cli("versions", "rollback", "food", made[1], env=env, timeout=120)
    assert rolled.returncode == 0, rolled.stderr
    wait_serving(client, "food", made[1])
    assert infer(client, "coffee").get_json()["results"][0]["label"] == "coffee"

    gone = cli("versions", "rollback", "food", made[0], env=env, timeout=120)
    assert gone.returncode == 2 and "no complete version" in gone.stderr
