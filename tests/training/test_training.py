"""Training straight through the function: the published files and what they hold."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from bench import demo
from service import encoders
from service.catalog.images import to_input
from service.catalog.view import View
from service.core.config import ROOT, Settings
from service.core.endpoint import parse_endpoint
from service.storage import versions
from service.storage.blobs import BlobCache
from service.storage.local import LocalStorage
from service.storage.manifest import blob_key
from service.training import train as training
from tests.helpers import make_zip


@pytest.fixture
def setup(tmp_path: Path, models_dir: Path) -> tuple[LocalStorage, Settings]:
    settings = Settings.load(
        {
            "storage_uri": str(tmp_path / "store"),
            "cache_dir": tmp_path / "cache",
            "models_dir": models_dir,
            "encode_batch_size": 4,
        }
    )
    return LocalStorage(tmp_path / "store"), settings


@pytest.mark.slow  # a fine-tuned train, every file checked
def test_a_published_version_holds_everything_the_manifest_lists(
    setup: tuple[LocalStorage, Settings], photos_zip: Path
) -> None:
    storage, settings = setup
    spec = parse_endpoint(ROOT / "endpoints" / "food.toml")
    stages: list[str] = []
    result = training.train(spec, photos_zip, storage, settings, lambda p: stages.append(p.stage))
    assert stages[0] == "ingest" and stages[-1] == "publish" and "embed" in stages and "index" in stages

    manifest = versions.read_manifest(storage, "food", result.version)
    assert manifest.format == 2 and manifest.change["kind"] == "train" and manifest.created_at
    assert (manifest.count, manifest.dim, manifest.metric) == (30, 1280, "angular")
    assert (
        json.loads(storage.read(versions.manifest_key("food", result.version)))["version"] == result.version
    )
    for ref in manifest.blobs():  # every file a blob named by its content, and it is that content
        assert versions.sha256_file(storage.local_path(blob_key("food", ref.sha256))) == ref.sha256
    assert versions.read_current(storage, "food").version == result.version

    (segment,) = manifest.segments
    assert segment.rows == segment.live == 30 and "vectors" in segment.files  # 30 rows: searched exactly
    fetch = BlobCache(storage, settings.cache_dir)
    view = View.open(manifest, lambda ref, label: fetch.path("food", ref, label), 0)
    rows = view.segments[0]
    assert [int(i) for i in rows.items] == list(range(30))  # new items: dense ids
    assert rows.names[0] == "astronaut/astronaut-crop-bottom-right.jpg"
    assert rows.entry(0)["label"] == "astronaut" and rows.entry(0)["metadata"]["title"]
    vectors = np.asarray(rows.vectors)
    assert vectors.dtype == np.float32 and vectors.shape == (30, 1280)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Row i is the embedding of image i, batching notwithstanding.
    encoder = encoders.load(encoders.offline_source(settings.models_dir), settings.hub_cache)
    original = storage.read(segment.image_key("food", rows.entry(7)["image"]))
    again = encoder.encode(to_input(demo.decode_jpeg(original), 160)[None])[0]
    assert float(again @ vectors[7]) > 0.9999


@pytest.mark.slow  # a second train
def test_the_original_bytes_are_kept(setup: tuple[LocalStorage, Settings]) -> None:
    storage, settings = setup
    png = demo.png(demo.photo("coins"))
    spec = parse_endpoint(ROOT / "endpoints" / "food.toml")
    result = training.train(spec, _zip(Path(settings.cache_dir), {"coins/c.png": png}), storage, settings)
    # Content-addressed: the same bytes under the same key, whatever version holds them.
    assert storage.read(blob_key("food", hashlib.sha256(png).hexdigest())) == png
    manifest = versions.read_manifest(storage, "food", result.version)
    view = View.open(
        manifest, lambda ref, label: BlobCache(storage, settings.cache_dir).path("food", ref, label), 0
    )
    assert view.segments[0].entry(0)["image"].endswith(".png")  # its type, for the image route


def _zip(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "upload.zip"
    path.write_bytes(make_zip(files))
    return path
