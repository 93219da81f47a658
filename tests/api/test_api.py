"""The HTTP API through Flask's test client: every route, and every error status it can answer."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from bench import demo
from tests.helpers import (
    assert_error,
    make_zip,
    photo_jpeg,
    train,
    upload,
    wait_job,
    wait_serving,
)

# --- reading endpoints --------------------------------------------------------------------


def test_health_answers_at_once(client: FlaskClient) -> None:
    body = client.get("/health").get_json()
    assert body["status"] == "ok" and set(body["endpoints"]) == {"fashion", "food"}


def test_endpoints_lists_every_endpoint(client: FlaskClient) -> None:
    names = [e["name"] for e in client.get("/endpoints").get_json()["endpoints"]]
    assert names == ["fashion", "food"]


def test_an_untrained_endpoint_says_so(client: FlaskClient) -> None:
    info = client.get("/fashion").get_json()
    assert (info["status"], info["version"], info["count"]) == ("untrained", None, 0)
    assert info["encoder"]["source"].startswith("https://tfhub.dev/")


def test_openapi_and_swagger_ui_are_served(client: FlaskClient) -> None:
    spec = client.get("/openapi.json").get_json()
    assert {
        "/{name}/infer",
        "/{name}/train",
        "/train",
        "/{name}/jobs/{job_id}",
        "/{name}/items/{item_id}/similar",
        "/{name}/items/{item_id}/image",
        "/{name}",
        "/endpoints",
        "/health",
    } <= set(spec["paths"])
    page = client.get("/docs")
    assert page.status_code == 200 and b"swagger-ui" in page.data
    with client.get("/docs/assets/swagger-ui-bundle.js") as asset:
        assert asset.status_code == 200


# --- training and inference on a trained endpoint -------------------------------------------


def test_training_reports_counts_labels_and_metadata(trained: FlaskClient) -> None:
    info = trained.get("/food").get_json()
    assert info["status"] == "ready" and info["count"] == 30
    assert set(info["labels"]) == {"astronaut", "chelsea", "coffee", "rocket", "colorwheel", "moon"}
    assert info["trained_at"] and info["encoder"]["serving"]["kind"] == "offline"


def test_infer_finds_the_same_photo_first(trained: FlaskClient) -> None:
    response = trained.post("/food/infer?k=3", data={"image": upload(photo_jpeg("rocket"), "r.jpg")})
    body = response.get_json()
    assert response.status_code == 200, body
    best = body["results"][0]
    assert best["name"] == "rocket/rocket-original.jpg" and best["label"] == "rocket"
    assert best["score"] >= 0.99
    assert best["metadata"] == {"title": "rocket (original)", "source": "scikit-image sample data"}
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    assert body["version"] == trained.get("/food").get_json()["version"]


def test_infer_uses_the_default_k(trained: FlaskClient) -> None:
    body = trained.post("/food/infer", data={"image": upload(photo_jpeg("coffee"), "c.jpg")}).get_json()
    assert len(body["results"]) == 10


def test_infer_takes_a_raw_image_body(trained: FlaskClient) -> None:
    response = trained.post("/food/infer?k=1", data=photo_jpeg("coffee"), content_type="image/jpeg")
    assert response.get_json()["results"][0]["name"] == "coffee/coffee-original.jpg"


def test_several_images_are_answered_as_a_batch(trained: FlaskClient) -> None:
    data = {"image": [upload(photo_jpeg("moon"), "a.jpg"), upload(photo_jpeg("chelsea"), "b.jpg")]}
    body = trained.post("/food/infer?k=2", data=data).get_json()
    assert [b["filename"] for b in body["batch"]] == ["a.jpg", "b.jpg"]
    assert body["batch"][0]["results"][0]["label"] == "moon"
    assert body["batch"][1]["results"][0]["label"] == "chelsea"
    single = trained.post("/food/infer?k=2", data={"image": upload(photo_jpeg("chelsea"), "b.jpg")})
    assert single.get_json()["results"] == body["batch"][1]["results"]


def test_a_transformed_photo_still_finds_its_original(trained: FlaskClient) -> None:
    small = photo_jpeg("astronaut", size=(200, 200), quality=60)
    body = trained.post("/food/infer?k=3", data={"image": upload(small, "small.jpg")}).get_json()
    assert "astronaut/astronaut-original.jpg" in [r["name"] for r in body["results"]]


def test_similar_items_exclude_the_item(trained: FlaskClient) -> None:
    first = trained.post("/food/infer?k=1", data=photo_jpeg("coffee"), content_type="image/jpeg")
    item = first.get_json()["results"][0]["id"]
    body = trained.get(f"/food/items/{item}/similar?k=4").get_json()
    assert body["id"] == item and len(body["results"]) == 4
    assert item not in [r["id"] for r in body["results"]]
    assert body["results"][0]["label"] == "coffee"


def test_image_urls_return_the_original_bytes(trained: FlaskClient, photos_zip: Path) -> None:
    import zipfile

    body = trained.post("/food/infer?k=1", data=photo_jpeg("moon"), content_type="image/jpeg").get_json()
    match = body["results"][0]
    with trained.get(match["image_url"]) as response, zipfile.ZipFile(photos_zip) as zf:
        assert response.status_code == 200 and response.mimetype == "image/jpeg"
        assert response.data == zf.read(match["name"])


# --- errors -----------------------------------------------------------------------------------


def test_unknown_endpoint_is_404(trained: FlaskClient) -> None:
    assert_error(trained.get("/shoes"), 404, "No endpoint named 'shoes'")
    assert_error(
        trained.post("/shoes/infer", data=photo_jpeg("moon"), content_type="image/jpeg"), 404, "shoes"
    )
    assert_error(trained.post("/shoes/train", data={"file": upload(b"x")}), 404, "shoes")


def test_unknown_job_and_item_are_404(trained: FlaskClient) -> None:
    assert_error(trained.get("/food/jobs/0123456789abcdef"), 404, "No training job")
    assert_error(trained.get("/food/jobs/not-an-id"), 404, "No training job")
    assert_error(trained.get("/food/items/999/similar"), 404, "no item 999")
    assert_error(trained.get("/food/items/999/image"), 404, "no item 999")
    assert_error(trained.get("/food/items/2/image?version=20200101T000000.000000Z-abcdef"), 404, "no item 2")
    assert_error(trained.get("/no/such/route/here"), 404)


def test_a_job_of_another_endpoint_is_404(trained: FlaskClient) -> None:
    jobs = trained.application.extensions["simsvc"].storage.list("jobs/")
    food_job = Path(jobs[0]).stem  # the fixture's training job
    assert trained.get(f"/food/jobs/{food_job}").status_code == 200
    assert_error(trained.get(f"/fashion/jobs/{food_job}"), 404, "No training job")


@pytest.mark.parametrize("data", [b"not an image at all", b"", b"\x89PNG\r\n\x1a\n truncated"])
def test_an_undecodable_image_is_400(trained: FlaskClient, data: bytes) -> None:
    assert_error(trained.post("/food/infer", data={"image": upload(data, "x.png")}), 400, "x.png")


def test_one_bad_image_in_a_batch_is_400_naming_it(trained: FlaskClient) -> None:
    data = {"image": [upload(photo_jpeg("moon"), "good.jpg"), upload(b"junk", "bad.jpg")]}
    assert_error(trained.post("/food/infer", data=data), 400, "bad.jpg")


@pytest.mark.parametrize("k", ["0", "101", "-1", "ten"])
def test_k_outside_its_range_is_422(trained: FlaskClient, k: str) -> None:
    response = trained.post(f"/food/infer?k={k}", data=photo_jpeg("moon"), content_type="image/jpeg")
    assert_error(response, 422, "k")
    assert_error(trained.get(f"/food/items/0/similar?k={k}"), 422, "k")


@pytest.mark.parametrize(
    ("content_type", "data"),
    [("application/json", b'{"image": "x"}'), ("text/plain", b"hello"), (None, b"raw")],
)
def test_the_wrong_content_type_is_415(trained: FlaskClient, content_type: str | None, data: bytes) -> None:
    assert_error(trained.post("/food/infer", data=data, content_type=content_type), 415)
    assert_error(trained.post("/train", data=data, content_type=content_type), 415)
    if content_type == "application/json":  # /train takes JSON: {"source": "s3://..."}
        assert_error(trained.post("/food/train", data=data, content_type=content_type), 422, "source")
    else:
        assert_error(trained.post("/food/train", data=data, content_type=content_type), 415)


def test_missing_fields_are_422(trained: FlaskClient) -> None:
    assert_error(trained.post("/food/infer", data={"other": upload(b"x")}), 422, "image")
    assert_error(trained.post("/food/train", data={"other": upload(b"x")}), 422, "file")
    assert_error(trained.post("/train", data={"file": upload(b"x")}), 422, "endpoint")


def test_a_file_that_is_not_a_zip_is_422(trained: FlaskClient) -> None:
    assert_error(
        trained.post("/food/train", data={"file": upload(b"PK\x03\x04 nope")}), 422, "not a valid zip"
    )


def test_an_untrained_endpoint_is_503(trained: FlaskClient) -> None:
    body = assert_error(
        trained.post("/fashion/infer", data=photo_jpeg("moon"), content_type="image/jpeg"),
        503,
        "no trained version",
    )
    assert "/fashion/train" in body["message"]
    assert_error(trained.get("/fashion/items/0/similar"), 503)


def test_bodies_over_the_limits_are_413(make_app: Callable[..., Flask]) -> None:
    client = make_app(max_image_mb=1, max_upload_mb=2).test_client()
    big = b"\xff" * (1024 * 1024 + 10)
    assert_error(client.post("/food/infer", data={"image": upload(big, "big.jpg")}), 413, "1 MB")
    assert_error(client.post("/food/infer", data=big, content_type="image/jpeg"), 413)
    assert_error(client.post("/food/train", data={"file": upload(big * 2, "big.zip")}), 413, "2 MB")


def test_no_error_response_carries_a_traceback(trained: FlaskClient) -> None:
    for response in (
        trained.post("/food/infer", data=b"x", content_type="image/png"),
        trained.post("/food/infer?k=0", data=b"x", content_type="image/png"),
        trained.get("/food/items/99999/similar"),
    ):
        assert b"Traceback" not in response.data and response.is_json


# --- training jobs ------------------------------------------------------------------------------


def test_train_answers_202_with_a_status_url(client: FlaskClient, photos_zip: Path) -> None:
    response = client.post("/food/train", data={"file": upload(photos_zip)})
    assert response.status_code == 202
    body = response.get_json()
    assert body["status_url"].endswith(f"/food/jobs/{body['job_id']}")
    assert response.headers["Location"] == body["status_url"]
    job = wait_job(client, body["status_url"])
    assert job["status"] == "succeeded" and job["stage"] == "publish"
    assert job["counts"]["images"] == 30 and job["skipped"] == [] and job["error"] is None


def test_train_also_takes_the_endpoint_as_a_form_field(client: FlaskClient, photos_zip: Path) -> None:
    response = client.post("/train", data={"endpoint": "fashion", "file": upload(photos_zip)})
    assert response.status_code == 202
    assert "/fashion/jobs/" in response.get_json()["status_url"]
    assert wait_job(client, response.get_json()["status_url"])["status"] == "succeeded"
    assert_error(client.post("/train", data={"endpoint": "shoes", "file": upload(photos_zip)}), 404)


def test_files_that_are_not_images_are_skipped_and_listed(client: FlaskClient) -> None:
    zip_bytes = make_zip(
        {
            "moon/moon.jpg": photo_jpeg("moon"),
            "coffee/coffee.png": photo_jpeg("coffee"),
            "notes/readme.txt": b"hello",
            "coffee/broken.jpg": photo_jpeg("coffee")[:300],
        }
    )
    job = train(client, "food", zip_bytes)
    assert job["status"] == "succeeded", job
    assert job["counts"]["images"] == 2
    assert {s["name"] for s in job["skipped"]} == {"notes/readme.txt", "coffee/broken.jpg"}
    assert all(s["reason"] for s in job["skipped"])


def test_a_zip_with_no_usable_image_fails_the_job_clearly(client: FlaskClient) -> None:
    job = train(client, "food", make_zip({"a.txt": b"hello", "b/c.csv": b"1,2"}))
    assert job["status"] == "failed"
    assert "no usable image" in job["error"]
    assert len(job["skipped"]) == 2
    assert client.get("/food").get_json()["version"] is None


def test_a_failed_job_keeps_the_published_version(client: FlaskClient, photos_zip: Path) -> None:
    good = train(client, "food", photos_zip)
    wait_serving(client, "food", good["version"])
    bad = train(client, "food", make_zip({"a.txt": b"nothing"}))
    assert bad["status"] == "failed"
    assert client.get("/food").get_json()["version"] == good["version"]
    assert client.post("/food/infer", data=photo_jpeg("moon"), content_type="image/jpeg").status_code == 200


def test_a_new_version_replaces_the_served_one_without_restart(client: FlaskClient, photos_zip: Path) -> None:
    first = train(client, "food", photos_zip)
    wait_serving(client, "food", first["version"])
    second = train(client, "food", make_zip({"moon/m.jpg": photo_jpeg("moon")}))
    wait_serving(client, "food", second["version"])
    body = client.post("/food/infer?k=5", data=photo_jpeg("moon"), content_type="image/jpeg").get_json()
    assert body["version"] == second["version"] and len(body["results"]) == 1
    # Image URLs handed out before the swap still return their own version's bytes.
    with (
        client.get(f"/food/items/0/image?version={first['version']}") as old,
        client.get("/food/items/0/image") as new,
    ):
        assert old.status_code == 200 and old.data != new.data


def test_a_zip_with_metadata_jsonl_carries_it_into_results(client: FlaskClient) -> None:
    meta = "\n".join(
        json.dumps(r)
        for r in [
            {"filename": "rocket/r.jpg", "sku": "R-1", "price": 99.5},
            {"filename": "moon/m.jpg", "sku": "M-1", "tags": ["night"]},
        ]
    )
    job = train(
        client,
        "food",
        make_zip(
            {
                "rocket/r.jpg": photo_jpeg("rocket"),
                "moon/m.jpg": photo_jpeg("moon"),
                "metadata.jsonl": meta.encode(),
            }
        ),
    )
    wait_serving(client, "food", job["version"])
    body = client.post("/food/infer?k=2", data=photo_jpeg("rocket"), content_type="image/jpeg").get_json()
    assert body["results"][0]["metadata"] == {"sku": "R-1", "price": 99.5}
    assert body["results"][1]["metadata"] == {"sku": "M-1", "tags": ["night"]}


def test_an_endpoint_with_a_local_saved_model_trains_and_serves(
    make_app: Callable[..., Flask], tiny_model: Path, tmp_path: Path, photos_zip: Path
) -> None:
    endpoints = tmp_path / "endpoints"
    endpoints.mkdir()
    (endpoints / "tiny.toml").write_text(f'[encoder]\nsource = "{tiny_model}"\ninput_size = 32\n')
    client = make_app(endpoints_dir=endpoints).test_client()
    job = train(client, "tiny", photos_zip)
    assert job["status"] == "succeeded", job
    wait_serving(client, "tiny", job["version"])
    info = client.get("/tiny").get_json()
    assert info["encoder"]["serving"]["kind"] == "saved_model" and info["encoder"]["serving"]["dim"] == 16
    body = client.post("/tiny/infer?k=1", data=photo_jpeg("rocket"), content_type="image/jpeg").get_json()
    assert body["results"][0]["label"] == "rocket"


def test_an_unfetchable_handle_fails_training_with_a_clear_error(
    make_app: Callable[..., Flask], tmp_path: Path, photos_zip: Path
) -> None:
    endpoints = tmp_path / "endpoints"
    endpoints.mkdir()
    handle = "http://127.0.0.1:9/google/imagenet/mobilenet/feature_vector.tar.gz"
    (endpoints / "remote.toml").write_text(f'[encoder]\nsource = "{handle}"\ninput_size = 224\n')
    client = make_app(endpoints_dir=endpoints, encoder_mode="hub").test_client()
    job = train(client, "remote", photos_zip)
    assert job["status"] == "failed"
    assert handle in job["error"] and "offline" in job["error"]


def test_job_status_is_shared_through_storage(make_app: Callable[..., Flask], photos_zip: Path) -> None:
    one, other = make_app().test_client(), make_app().test_client()  # two "workers", one store
    response = one.post("/food/train", data={"file": upload(photos_zip)})
    job = wait_job(other, response.get_json()["status_url"])
    assert job["status"] == "succeeded"
    wait_serving(other, "food", job["version"])


def test_uploads_are_deleted_after_the_job(client: FlaskClient, photos_zip: Path) -> None:
    train(client, "food", photos_zip)
    train(client, "food", make_zip({"a.txt": b"x"}))
    assert list(client.application.extensions["simsvc"].uploads_dir.iterdir()) == []


def test_raw_images_of_every_format_are_accepted(trained: FlaskClient) -> None:
    from PIL import Image

    for fmt, ctype in [
        ("PNG", "image/png"),
        ("WEBP", "image/webp"),
        ("BMP", "image/bmp"),
        ("GIF", "image/gif"),
    ]:
        out = io.BytesIO()
        demo.photo("rocket").save(out, format=fmt)
        body = trained.post("/food/infer?k=1", data=out.getvalue(), content_type=ctype).get_json()
        assert body["results"][0]["label"] == "rocket", fmt
    assert Image  # PIL is what made the files above


def test_zip_limits_are_checked_before_answering(make_app: Callable[..., Flask]) -> None:
    app = make_app(max_zip_entries=3)
    client = app.test_client()
    five = make_zip({f"a/{i}.jpg": b"x" for i in range(5)})
    assert_error(
        client.post("/food/train", data={"file": upload(five)}), 413, "5 entries, over the limit of 3"
    )
    assert list(app.extensions["simsvc"].uploads_dir.iterdir()) == []


def test_a_rejected_upload_leaves_no_file_behind(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    client = app.test_client()
    future = bytearray(make_zip({"a.jpg": b"1"}))
    future[future.index(b"PK\x01\x02") + 6] = 99  # needs zip format 9.9
    assert_error(client.post("/food/train", data={"file": upload(bytes(future))}), 422, "not a valid zip")
    assert_error(client.post("/food/train", data={"file": upload(b"nope")}), 422)
    assert list(app.extensions["simsvc"].uploads_dir.iterdir()) == []


def test_an_endpoint_still_loading_says_retry_later(
    make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(warm_on_start=False)
    runtime = app.extensions["simsvc"].registry.get("food")
    monkeypatch.setattr(runtime, "load_wait_s", 0.2)  # a request waits this long for a load
    with runtime._lock:  # a load under way in another thread holds the lock
        runtime.checked, runtime.loading = True, "20260101T000000.000000Z-abcdef"
        response = app.test_client().post("/food/infer", data=photo_jpeg("moon"), content_type="image/jpeg")
    assert_error(response, 503, "is loading version")
    assert response.headers["Retry-After"] == "2"


def test_only_versioned_image_urls_are_cacheable(trained: FlaskClient) -> None:
    version = trained.get("/food").get_json()["version"]
    with (
        trained.get(f"/food/items/0/image?version={version}") as fixed,
        trained.get("/food/items/0/image") as moving,
    ):
        assert "max-age=86400" in fixed.headers["Cache-Control"]
        assert "max-age=0" in moving.headers["Cache-Control"]


def test_versions_are_named_when_the_zip_is_uploaded(
    make_app: Callable[..., Flask], photos_zip: Path
) -> None:
    client = make_app().test_client()
    first = client.post("/food/train", data={"file": upload(photos_zip)}).get_json()
    second = client.post("/food/train", data={"file": upload(make_zip({"m/m.jpg": photo_jpeg("moon")}))})
    done = [wait_job(client, r["status_url"]) for r in (first, second.get_json())]
    assert [j["status"] for j in done] == ["succeeded", "succeeded"]
    assert done[0]["version"] < done[1]["version"]  # queued second, so newer, so it wins
    wait_serving(client, "food", done[1]["version"])


def test_versions_built_by_the_offline_encoder_survive_a_move_of_the_models(
    make_app: Callable[..., Flask], models_dir: Path, tmp_path: Path, photos_zip: Path
) -> None:
    import shutil

    first = make_app().test_client()
    job = train(first, "food", photos_zip)
    moved = tmp_path / "elsewhere"
    shutil.copytree(models_dir / "offline-mobilenetv2-160", moved / "offline-mobilenetv2-160")
    client = make_app(models_dir=moved).test_client()
    wait_serving(client, "food", job["version"])
    body = client.post("/food/infer?k=1", data=photo_jpeg("moon"), content_type="image/jpeg").get_json()
    assert body["version"] == job["version"] and body["results"][0]["label"] == "moon"
