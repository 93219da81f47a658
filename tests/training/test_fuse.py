"""A trained head fused with the converted backbone: one invoke per query, the NumPy head's answers."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient

from bench import demo
from service import encoders
from service.catalog.head import FUSED_FILE, Head, HeadEncoder
from service.catalog.images import prepare
from service.core.config import Settings
from service.encoders import convert
from service.serving.query import ranked
from service.serving.registry import load_version
from service.serving.search import entry_of
from service.storage import versions
from service.storage.blobs import BlobCache
from service.storage.manifest import blob_key
from service.training import fuse
from tests.helpers import make_zip, upload, wait_job, wait_serving

pytestmark = pytest.mark.slow  # a conversion of the offline encoder with a head (seconds)


def submit(client: FlaskClient, path: str, data: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, data=data)
    assert response.status_code == 202, response.get_json()
    job = wait_job(client, response.get_json()["status_url"], timeout=300)
    assert job["status"] == "succeeded", job
    wait_serving(client, "food", job["version"])
    return job


class NoBackbone:
    """Stands in for the backbone of a fused version: any call means a second invoke."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the backbone's {name} was used: the fused model should answer alone")


def test_a_trained_head_is_fused_and_answers_like_the_numpy_head(
    make_app: Callable[..., Flask], photos_zip: Path
) -> None:
    client = make_app(fuse_head=True).test_client()
    job = submit(client, "/food/train", {"file": upload(photos_zip), "fine_tune": "always"})
    service = client.application.extensions["simsvc"]
    manifest = versions.read_manifest(service.storage, "food", job["version"])
    assert manifest.head is not None and set(manifest.head.files) == {"head.json", "head.npz", FUSED_FILE}
    how = manifest.runtime["head"]
    assert how["fused"] is True and how["checked_images"] >= 8 + 30 and how["min_cosine"] >= 0.9999

    loaded = service.registry.get("food").current()
    assert isinstance(loaded.encoder, HeadEncoder) and loaded.encoder.fused is not None
    numpy_head = HeadEncoder(loaded.encoder.backbone, loaded.encoder.head)  # the path before fusing
    with zipfile.ZipFile(photos_zip) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith((".jpg", ".jpeg", ".png")))
        originals = [zf.read(n) for n in names]
    inputs = np.stack([prepare(data, loaded.encoder.input_size, 10**8)[0] for data in originals])
    fused_vectors, fused_backbone = loaded.encoder.encode_both(inputs)
    numpy_vectors, numpy_backbone = numpy_head.encode_both(inputs)
    assert np.abs(fused_vectors - numpy_vectors).max() < 1e-4
    assert np.abs(fused_backbone - numpy_backbone).max() < 1e-4

    # Through /infer: the same items in the same order as the NumPy head ranks them, scores to 1e-4,
    # with the backbone never called (one invoke of the fused model per query).
    loaded.encoder.backbone = NoBackbone()
    for data, plain in zip(originals[:6], numpy_vectors[:6], strict=True):
        body = client.post("/food/infer?k=5", data=data, content_type="image/jpeg").get_json()
        expected = ranked(loaded.view, plain, 5, loaded.query)
        assert [r["id"] for r in body["results"]] == [entry_of(loaded.view, h)[0] for h in expected]
        for result, hit in zip(body["results"], expected, strict=True):
            assert abs(result["score"] - hit.score) < 1e-4
    duplicates = client.post("/food/infer?k=3&duplicates=true", data=originals[0], content_type="image/jpeg")
    assert duplicates.get_json()["results"][0]["duplicate"] is True
    assert client.get("/food").get_json()["runtime"]["head"]["served"] == "fused"

    # An add that keeps the head keeps its fused model (the same blob)
    extra = make_zip({"new/page.jpg": demo.jpeg(demo.photo("page"))})
    added = submit(client, "/food/items", {"file": upload(extra)})
    after = versions.read_manifest(service.storage, "food", added["version"])
    assert after.head is not None and after.head.files[FUSED_FILE] == manifest.head.files[FUSED_FILE]
    assert after.runtime["head"] == manifest.runtime["head"]
    assert service.registry.get("food").current().encoder.fused is not None

    # FUSE_HEAD=0 serves the same version with the head in NumPy; so does a damaged head.tflite
    spec, settings = service.specs["food"], service.settings
    off = load_version(
        service.storage, spec, job["version"], replace(settings, fuse_head=False), service.blobs
    )
    assert off.encoder.fused is None and off.runtime["head"]["served"] == "numpy (FUSE_HEAD=0)"
    blob = service.storage.local_path(blob_key("food", manifest.head.files[FUSED_FILE].sha256))
    blob.write_bytes(b"not a model")
    fresh = BlobCache(service.storage, settings.cache_dir / "fresh")
    damaged = load_version(service.storage, spec, job["version"], settings, fresh)
    assert damaged.encoder.fused is None and damaged.runtime["head"]["served"].startswith("numpy (")
    assert np.abs(damaged.encoder.encode(inputs[:4]) - numpy_vectors[:4]).max() < 1e-4


def test_a_head_whose_thumbnail_does_not_divide_the_input_is_not_fused(
    tmp_path: Path, models_dir: Path
) -> None:
    settings = Settings.load(
        {"models_dir": models_dir, "cache_dir": tmp_path / "cache", "warm_on_start": False}
    )
    encoder = encoders.load(encoders.offline_source(models_dir), settings.hub_cache)
    verified = convert.prepare(encoder, settings.cache_dir, "litert")
    side = 7  # 160 px inputs do not split into 7 equal blocks: NumPy's box filter has no TFLite twin
    weights = {
        "thumb_mean": np.zeros(side * side * 3, np.float32),
        "thumb_std": np.ones(side * side * 3, np.float32),
        "feature_w": np.ones((encoder.dim + side * side * 3, 4), np.float32),
        "feature_b": np.zeros(4, np.float32),
    }
    head = Head({"thumbnail": side, "feature_dim": 4, "labels": ["a", "b"]}, weights)
    path, how = fuse.fuse(verified, head, np.zeros((0, 160, 160, 3), np.uint8), tmp_path, 0.9999)
    assert path is None and how["fused"] is False and "uneven blocks" in how["reason"]
