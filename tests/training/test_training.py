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
from service.core.config import ROOT, Settings
from service.core.endpoint import parse_endpoint
from service.storage import versions
from service.storage.local import LocalStorage
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

    prefix = versions.version_prefix("food", result.version)
    manifest = json.loads(storage.read(prefix + "manifest.json"))
    for field in ("endpoint", "version", "encoder", "dim", "metric", "n_trees", "count", "created_at"):
        assert field in manifest
    assert (manifest["count"], manifest["dim"], manifest["metric"]) == (30, 1280, "angular")
    for name, entry in manifest["files"].items():
        assert versions.sha256_file(storage.local_path(prefix + name)) == entry["sha256"]
    assert versions.read_current(storage, "food").version == result.version

    ids = json.loads(storage.read(prefix + "ids.json"))
    meta = json.loads(storage.read(prefix + "metadata.json"))
    assert sorted(ids, key=int) == [str(i) for i in range(30)]  # dense integer ids
    assert ids["0"] == "astronaut/astronaut-crop-bottom-right.jpg"
    assert meta["0"]["label"] == "astronaut" and meta["0"]["metadata"]["title"]

    vectors = np.load(storage.local_path(prefix + "vectors.npy"), allow_pickle=False)
    assert vectors.dtype == np.float32 and vectors.shape == (30, 1280)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Row i is the embedding of image i, batching notwithstanding.
    encoder = encoders.load(encoders.offline_source(settings.models_dir), settings.hub_cache)
    original = storage.read(prefix + meta["7"]["image"])
    again = encoder.encode(to_input(demo.decode_jpeg(original), 160)[None])[0]
    assert float(again @ vectors[7]) > 0.9999


@pytest.mark.slow  # a second train
def test_the_original_bytes_are_kept(setup: tuple[LocalStorage, Settings]) -> None:
    storage, settings = setup
    png = demo.png(demo.photo("coins"))
    spec = parse_endpoint(ROOT / "endpoints" / "food.toml")
    result = training.train(spec, _zip(Path(settings.cache_dir), {"coins/c.png": png}), storage, settings)
    prefix = versions.version_prefix("food", result.version)
    # Content-addressed: the same bytes under the same key in every version that holds them.
    assert storage.read(prefix + f"images/{hashlib.sha256(png).hexdigest()}.png") == png


def _zip(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "upload.zip"
    path.write_bytes(make_zip(files))
    return path
