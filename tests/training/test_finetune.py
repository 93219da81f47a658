"""Fine-tuned heads end to end: trained from a labelled zip, published with the version, used by
inference, and scored on a hold-out; the evaluate command."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image, ImageEnhance, ImageOps

from bench import demo
from service.catalog.images import prepare
from service.storage import versions
from tests.helpers import TEST_PHOTOS, cli, make_zip, upload, wait_job, wait_serving


def train_with(client: FlaskClient, zip_bytes: bytes, fine_tune: str) -> dict:
    response = client.post("/food/train", data={"file": upload(zip_bytes), "fine_tune": fine_tune})
    assert response.status_code == 202, response.get_json()
    job = wait_job(client, response.get_json()["status_url"])
    assert job["status"] == "succeeded", job
    wait_serving(client, "food", job["version"])
    return job


@pytest.fixture
def client(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app().test_client()


def test_a_labelled_zip_trains_a_head_and_reports_hold_out_metrics(
    client: FlaskClient, photos_zip: Path
) -> None:
    job = train_with(client, photos_zip.read_bytes(), "always")
    evaluation = job["evaluation"]
    assert evaluation["kept"] == "fine_tuned" and evaluation["labels"] == 6
    assert evaluation["holdout_queries"] == 6  # one of each label's five images
    for side in ("frozen", "fine_tuned"):
        assert set(evaluation[side]) >= {"precision@1", "precision@10", "map@10"}
        assert 0.0 <= evaluation[side]["precision@10"] <= 1.0
    info = client.get("/food").get_json()
    assert info["encoder"]["serving"]["kind"] == "offline" and info["count"] == 30
    store = client.application.extensions["simsvc"].storage
    manifest = versions.read_manifest(store, "food", job["version"])
    assert manifest.dim == 256 and manifest.head is not None and manifest.head.feature_dim == 256
    assert manifest.evaluation == evaluation
    assert set(manifest.head.files) == {"head.json", "head.npz"}
    assert manifest.runtime["head"] == {"fused": False, "reason": "FUSE_HEAD=0"}  # the tests' setting


def test_an_unlabelled_zip_does_not_train_a_head(client: FlaskClient) -> None:
    zip_bytes = make_zip({f"{n}.jpg": demo.jpeg(demo.photo(n)) for n in ("moon", "coffee", "rocket")})
    job = train_with(client, zip_bytes, "auto")
    assert job["evaluation"] == {
        "kept": "frozen",
        "reason": "fewer than two label folders with 5 or more images",
    }
    store = client.application.extensions["simsvc"].storage
    manifest = versions.read_manifest(store, "food", job["version"])
    assert manifest.head is None and manifest.dim == 1280


def test_fine_tune_always_without_labels_fails_clearly(client: FlaskClient) -> None:
    response = client.post(
        "/food/train",
        data={"file": upload(make_zip({"a.jpg": demo.jpeg(demo.photo("moon"))})), "fine_tune": "always"},
    )
    job = wait_job(client, response.get_json()["status_url"])
    assert job["status"] == "failed" and "fine_tune=always needs at least two label folders" in job["error"]


def test_a_bad_fine_tune_value_is_422(client: FlaskClient, photos_zip: Path) -> None:
    response = client.post("/food/train", data={"file": upload(photos_zip), "fine_tune": "sometimes"})
    assert response.status_code == 422 and "fine_tune" in response.get_json()["errors"]


def test_inference_uses_the_versions_own_head(client: FlaskClient, photos_zip: Path) -> None:
    job = train_with(client, photos_zip.read_bytes(), "always")
    wait_serving(client, "food", job["version"])
    segment = client.application.extensions["simsvc"].registry.get("food").current().view.segments[0]
    vectors = np.asarray(segment.vectors)
    with zipfile.ZipFile(photos_zip) as zf:
        original = zf.read(segment.names[12])

    loaded = client.application.extensions["simsvc"].registry.get("food").current()
    again = loaded.encoder.encode(prepare(original, loaded.encoder.input_size, 10**8)[0][None])[0]
    assert again.shape == (256,) and float(again @ vectors[12]) > 0.9999

    body = client.post("/food/infer?k=1", data=original, content_type="image/jpeg").get_json()
    assert body["results"][0]["id"] == 12 and body["results"][0]["score"] >= 0.9999
    copies_and_new_photos_find_their_catalogue_photos(client)


@pytest.mark.slow  # two trains
def test_versions_with_and_without_a_head_each_serve_with_their_own_encoder(
    client: FlaskClient, photos_zip: Path
) -> None:
    tuned = train_with(client, photos_zip.read_bytes(), "always")
    info = client.get("/food").get_json()
    assert info["encoder"]["serving"].get("kind") == "offline"
    rocket = demo.jpeg(demo.photo("rocket"))
    first = client.post("/food/infer?k=1", data=rocket, content_type="image/jpeg").get_json()
    assert first["version"] == tuned["version"] and first["results"][0]["score"] >= 0.9999

    plain = train_with(client, photos_zip.read_bytes(), "never")
    store = client.application.extensions["simsvc"].storage
    assert versions.read_manifest(store, "food", plain["version"]).head is None
    second = client.post("/food/infer?k=1", data=rocket, content_type="image/jpeg").get_json()
    assert second["version"] == plain["version"] and second["results"][0]["score"] >= 0.9999
    assert second["results"][0]["name"] == first["results"][0]["name"] == "rocket/rocket-original.jpg"

    # Rolling back to the fine-tuned version brings its head back with it.
    versions.rollback(store, "food", tuned["version"])
    wait_serving(client, "food", tuned["version"])
    again = client.post("/food/infer?k=1", data=rocket, content_type="image/jpeg").get_json()
    assert again["results"][0]["score"] >= 0.9999


@pytest.mark.slow  # the CLI as a subprocess: TensorFlow loads again
def test_the_evaluate_command_scores_the_served_version(
    tmp_path: Path, models_dir: Path, photos_zip: Path
) -> None:
    env = {
        **os.environ,
        "STORAGE_URI": str(tmp_path / "store"),
        "CACHE_DIR": str(tmp_path / "cache"),
        "MODELS_DIR": str(models_dir),
    }
    trained = cli("train", "food", str(photos_zip), "--fine-tune", "never", env=env)
    assert trained.returncode == 0, trained.stderr
    queries = tmp_path / "queries.zip"
    queries.write_bytes(
        make_zip(
            {
                "coffee/q1.jpg": demo.jpeg(demo.photo("coffee").resize((300, 200)), 70),
                "moon/q2.jpg": demo.jpeg(demo.photo("moon").rotate(3)),
                "mystery/q3.jpg": demo.jpeg(demo.photo("rocket")),
            }
        )
    )
    scored = cli("evaluate", "food", str(queries), env=env)
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout)
    assert result["queries"] == 3 and result["labels_not_in_index"] == ["mystery"]
    assert result["precision@1"] == pytest.approx(2 / 3, abs=1e-3)  # coffee and moon find their own
    assert 0.0 < result["map@10"] <= 1.0 and result["fine_tuned"] is False


def copies_and_new_photos_find_their_catalogue_photos(client: FlaskClient) -> None:
    """Issue 23's check on the demo's photos, with the default head: a resized, recompressed (and
    mirrored) copy of a catalogue photo comes back first, and a new photo of the same object
    (another crop, darker) ranks that object's catalogue photos first."""

    def top(image: Image.Image, k: int) -> list[dict]:
        data = demo.jpeg(image, quality=35)
        return client.post(f"/food/infer?k={k}", data=data, content_type="image/jpeg").get_json()["results"]

    for name in TEST_PHOTOS:
        original = demo.photo(name)
        small = original.resize((original.width // 2, original.height // 2))
        assert top(small, 1)[0]["name"] == f"{name}/{name}-original.jpg"
        mirrored = top(ImageOps.mirror(small), 1)[0]["name"]
        assert mirrored in (f"{name}/{name}-original.jpg", f"{name}/{name}-mirror.jpg")
        w, h = original.size
        crop = original.crop((w // 5, h // 4, w // 5 + int(w * 0.6), h // 4 + int(h * 0.6)))
        new_photo = ImageEnhance.Brightness(crop).enhance(0.8)
        assert [r["label"] for r in top(new_photo, 5)] == [name] * 5
