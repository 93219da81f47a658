"""The converted encoder in service: stored with each version, served by LiteRT, TensorFlow as the fallback;
jobs in a child process, so the Procfile's web workers never load TensorFlow."""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import requests
from flask import Flask
from PIL import Image

from service.catalog import images
from service.encoders import litert
from service.serving import registry as registry_module
from service.storage import versions
from service.storage.local import LocalStorage
from service.storage.manifest import BlobRef, Manifest, blob_key
from tests.helpers import make_zip, photo_jpeg, procfile_server, train, wait_job, wait_serving


def _manifest(store: Path, endpoint: str, version: str) -> Manifest:
    return versions.read_manifest(LocalStorage(store), endpoint, version)


def _model(store: Path, manifest: Manifest) -> Path:
    """The converted encoder's blob in the local store."""
    assert manifest.encoder_model is not None
    return store / blob_key(manifest.endpoint, manifest.encoder_model.sha256)


def test_a_trained_version_carries_its_checked_converted_encoder(
    make_app: Callable[..., Flask], tmp_path: Path, photos_zip: Path
) -> None:
    client = make_app().test_client()
    job = train(client, "food", photos_zip)
    assert job["status"] == "succeeded", job
    # The job says which runtime serves its version, with the evidence of the check.
    runtime = job["runtime"]
    assert runtime["name"] == "litert" and runtime["file"] == "encoder.tflite"
    assert runtime["checked_samples"] == 8 and runtime["min_cosine_samples"] >= 0.9999
    assert runtime["checked_images"] == 32 and runtime["min_cosine_images"] >= 0.9999
    # Listed in the manifest with its sha256 and size, a blob like every file of a version.
    manifest = _manifest(tmp_path / "store", "food", job["version"])
    data = _model(tmp_path / "store", manifest).read_bytes()
    assert manifest.encoder_model == BlobRef(hashlib.sha256(data).hexdigest(), len(data))
    assert manifest.runtime == runtime
    wait_serving(client, "food", job["version"])
    described = client.get("/food").get_json()
    assert described["runtime"]["name"] == "litert"
    # The served encoder is LiteRT's, and it answers like TensorFlow would (the version's vectors).
    loaded = client.application.extensions["simsvc"].registry.endpoints["food"].loaded
    assert isinstance(getattr(loaded.encoder, "backbone", loaded.encoder), litert.LiteEncoder)
    best = client.post("/food/infer", data=photo_jpeg("rocket"), content_type="image/jpeg").get_json()[
        "results"
    ][0]
    assert best["name"] == "rocket/rocket-original.jpg" and best["score"] >= 0.99


def test_changes_keep_the_converted_encoder_and_adds_bring_their_own(
    make_app: Callable[..., Flask], tmp_path: Path, photos_zip: Path
) -> None:
    client = make_app().test_client()
    first = train(client, "food", photos_zip)
    store = tmp_path / "store"
    model = _manifest(store, "food", first["version"]).encoder_model
    deleted = client.delete("/food/items/0").get_json()
    edited = client.patch("/food/items/1", json={"label": "renamed"}).get_json()
    for answer in (deleted, edited):
        manifest = _manifest(store, "food", answer["version"])
        assert manifest.runtime["name"] == "litert" and manifest.encoder_model == model
    added = client.post(
        "/food/items", data={"file": (io.BytesIO(make_zip({"new/one.jpg": photo_jpeg("camera")})), "add.zip")}
    )
    assert added.status_code == 202, added.get_json()
    job = wait_job(client, added.get_json()["status_url"])
    assert job["status"] == "succeeded" and job["runtime"]["name"] == "litert", job
    # The same conversion is the same blob: one copy in the store, never downloaded again.
    assert _manifest(store, "food", job["version"]).encoder_model == model


def test_encoder_runtime_tensorflow_serves_with_tensorflow_and_says_why(
    make_app: Callable[..., Flask], tmp_path: Path, photos_zip: Path
) -> None:
    client = make_app(encoder_runtime="tensorflow").test_client()
    job = train(client, "food", photos_zip)
    assert job["status"] == "succeeded", job
    assert job["runtime"] == {"name": "tensorflow", "reason": "ENCODER_RUNTIME=tensorflow"}
    assert _manifest(tmp_path / "store", "food", job["version"]).encoder_model is None
    wait_serving(client, "food", job["version"])
    assert client.get("/food").get_json()["runtime"]["name"] == "tensorflow"


def test_a_version_whose_converted_model_cannot_load_is_served_by_tensorflow(
    make_app: Callable[..., Flask], photos_zip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_app().test_client()
    job = train(client, "food", photos_zip)

    def unavailable(*_: object) -> litert.LiteEncoder:
        raise litert.EncoderUnavailableError("LiteRT (ai-edge-litert) is not usable here: not installed")

    # As on an instance without LiteRT: the version still serves, on TensorFlow, and says so.
    monkeypatch.setattr(registry_module.litert, "load", unavailable)
    second = make_app().test_client()
    wait_serving(second, "food", job["version"])
    runtime = second.get("/food").get_json()["runtime"]
    assert runtime["name"] == "tensorflow" and "not installed" in runtime["reason"]
    answer = second.post("/food/infer", data=photo_jpeg("rocket"), content_type="image/jpeg").get_json()
    assert answer["results"][0]["name"] == "rocket/rocket-original.jpg"


def test_litert_vectors_match_tensorflow_on_the_test_photos(
    models_dir: Path, photos_zip: Path, tmp_path: Path
) -> None:
    from service import encoders
    from service.encoders import convert

    encoder = encoders.load(encoders.offline_source(models_dir), models_dir / "tfhub")
    import zipfile

    with zipfile.ZipFile(photos_zip) as zf:
        names = [n for n in zf.namelist() if n.endswith(".jpg")][:16]
        batch = np.stack(
            [
                images.to_input(Image.open(io.BytesIO(zf.read(n))).convert("RGB"), encoder.input_size)
                for n in names
            ]
        )
    lite = litert.LiteEncoder(
        convert.converted_file(encoder, models_dir.parent / "cache"), encoder.describe()
    )
    cos = convert.cosines(encoder.raw(batch), lite.raw(batch))
    assert cos.min() >= 0.9999, cos


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.slow
def test_procfile_workers_train_in_a_child_and_never_load_tensorflow(
    tmp_path: Path, models_dir: Path, photos_zip: Path
) -> None:
    env = {"WEB_CONCURRENCY": "2", "MODELS_DIR": str(models_dir), "WATCH_INTERVAL_S": "0.5"}
    with procfile_server(tmp_path, env) as server:
        response = requests.post(
            f"{server.url}/food/train", files={"file": ("p.zip", photos_zip.read_bytes())}, timeout=30
        )
        assert response.status_code == 202, response.text
        deadline = time.monotonic() + 240
        while (job := requests.get(response.json()["status_url"], timeout=10).json())["status"] not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline, job
            time.sleep(0.3)
        assert job["status"] == "succeeded" and job["runtime"]["name"] == "litert", job
        server.versions_by_worker("food", job["version"])
        answer = requests.post(
            f"{server.url}/food/infer", files={"image": ("q.jpg", photo_jpeg("rocket"))}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][0]["name"] == "rocket/rocket-original.jpg"
        assert requests.get(f"{server.url}/food", timeout=10).json()["runtime"]["name"] == "litert"
        workers = server.workers()
        assert len(workers) == 2
        for pid in workers:
            mapped = _maps(pid)
            assert "libtensorflow_framework" not in mapped and "libtensorflow_cc" not in mapped, pid
            assert "_pywrap_litert_interpreter_wrapper" in mapped  # it serves, with LiteRT


def test_a_tampered_converted_model_is_never_served(
    make_app: Callable[..., Flask], tmp_path: Path, photos_zip: Path
) -> None:
    client = make_app().test_client()
    job = train(client, "food", photos_zip)
    model = _model(tmp_path / "store", _manifest(tmp_path / "store", "food", job["version"]))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit pattern changed: it would still load
    model.write_bytes(bytes(data))
    fresh = make_app(cache_dir=tmp_path / "cache-2").test_client()
    answer = fresh.post("/food/infer", data=photo_jpeg("rocket"), content_type="image/jpeg")
    assert answer.status_code == 503, answer.get_json()
    assert "encoder.tflite" in fresh.get("/food").get_json()["error"]


def test_a_fine_tuned_version_answers_the_same_on_litert_and_on_tensorflow(
    make_app: Callable[..., Flask], photos_zip: Path
) -> None:
    lite = make_app().test_client()
    form = {"file": (io.BytesIO(photos_zip.read_bytes()), "p.zip"), "fine_tune": "always"}
    job = wait_job(lite, lite.post("/food/train", data=form).get_json()["status_url"])
    assert job["status"] == "succeeded" and job["evaluation"]["kept"] == "fine_tuned", job
    wait_serving(lite, "food", job["version"])
    # The same version, served by TensorFlow: the operator's switch (ENCODER_RUNTIME=tensorflow).
    tf = make_app(encoder_runtime="tensorflow").test_client()
    wait_serving(tf, "food", job["version"])
    served = [
        c.application.extensions["simsvc"].registry.endpoints["food"].loaded.encoder for c in (lite, tf)
    ]
    assert isinstance(served[0].backbone, litert.LiteEncoder)
    assert not isinstance(served[1].backbone, litert.LiteEncoder)
    switched = {"name": "tensorflow", "reason": "ENCODER_RUNTIME=tensorflow"}
    # ... and says what serves the head here (the tests make no fused model: FUSE_HEAD=0)
    expected = {**switched, "head": {"served": "numpy (FUSE_HEAD=0)"}}
    assert tf.get("/food").get_json()["runtime"] == expected
    for name in ("rocket", "chelsea", "coffee"):
        answers = [
            c.post("/food/infer?k=8", data=photo_jpeg(name), content_type="image/jpeg").get_json()["results"]
            for c in (lite, tf)
        ]
        assert [r["id"] for r in answers[0]] == [r["id"] for r in answers[1]], name
        assert np.allclose([r["score"] for r in answers[0]], [r["score"] for r in answers[1]], atol=1e-3)


def test_a_job_that_embeds_nothing_still_checks_the_converted_model_on_its_images(
    make_app: Callable[..., Flask], photos_zip: Path
) -> None:
    client = make_app().test_client()
    assert train(client, "food", photos_zip)["status"] == "succeeded"
    again = train(client, "food", photos_zip)  # every vector reused from the first version
    assert again["counts"]["embedded"] == 0, again["counts"]
    assert again["runtime"]["name"] == "litert" and again["runtime"]["checked_images"] == 30, again["runtime"]
    assert again["runtime"]["min_cosine_images"] >= 0.9999


def test_a_model_tflite_cannot_express_trains_and_serves_on_tensorflow_and_says_why(
    make_app: Callable[..., Flask], tmp_path: Path, photos_zip: Path
) -> None:
    from tests.encoders.standins import UNCONVERTIBLE_SIZE, unconvertible

    unconvertible(tmp_path / "svd-model")
    endpoints = tmp_path / "endpoints"
    endpoints.mkdir()
    (endpoints / "spectral.toml").write_text(
        f'[encoder]\nsource = "{tmp_path / "svd-model"}"\ninput_size = {UNCONVERTIBLE_SIZE}\n'
        "[head]\nfeature_dim = 8\n"
    )
    client = make_app(endpoints_dir=endpoints).test_client()
    job = train(client, "spectral", photos_zip)
    assert job["status"] == "succeeded", job
    assert job["runtime"]["name"] == "tensorflow" and "Svd" in job["runtime"]["reason"], job["runtime"]
    wait_serving(client, "spectral", job["version"])
    head = {**job["runtime"]["head"], "served": "numpy (FUSE_HEAD=0)"}  # and what serves its head
    assert client.get("/spectral").get_json()["runtime"] == {**job["runtime"], "head": head}
    answer = client.post("/spectral/infer", data=photo_jpeg("rocket"), content_type="image/jpeg")
    assert answer.status_code == 200, answer.get_json()


def test_errors_that_cross_from_a_job_process_stay_the_service_s_or_python_s() -> None:
    from service.core.errors import TrainingError
    from service.jobs.child import _portable

    skipped = TrainingError("no usable image", ["a.txt"])
    assert _portable(skipped) is skipped
    assert isinstance(_portable(OSError(28, "No space left")), OSError)

    class TensorFlowLike(Exception):  # any other library's error: its unpickling could import it
        __module__ = "tensorflow.python.framework.errors_impl"

    for foreign in (TensorFlowLike("OOM when allocating"), KeyboardInterrupt(), SystemExit(3)):
        crossed = _portable(foreign)
        assert type(crossed) is RuntimeError and type(foreign).__name__ in str(crossed)


def test_a_nan_from_the_converted_model_never_passes_the_check() -> None:
    from service.encoders import convert

    reference = np.ones((2, 4), np.float32)
    assert convert.worst_cosine(reference, reference) == pytest.approx(1.0)
    assert convert.worst_cosine(reference, np.full((2, 4), np.nan, np.float32)) == -1.0
    assert convert.worst_cosine(reference, np.array([[1, 1, 1, 1], [np.inf, 0, 0, 0]], np.float32)) == -1.0
