"""Conversion to TFLite for every architecture the endpoints name, checked on real photos.

MobileNetV2 is the bundled offline encoder (real ImageNet weights); EfficientNet-B0 and a BiT
ResNet-v2 are stand-ins with random weights built like TF-Hub's feature-vector SavedModels
(tests/standins.py), loaded through the service's own `Encoder` (hub.KerasLayer). A model that
TFLite's built-in ops cannot express, and a converted model that disagrees with TensorFlow on a
job's images, are served by TensorFlow, and the runtime entry says why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from bench import demo
from service import encoders
from service.catalog import images
from service.core import inflight
from service.encoders import Encoder, convert, litert
from tests.encoders import standins
from tests.helpers import TEST_PHOTOS

MIN_COSINE = 0.9999
DIMS = {"mobilenet_v2": 1280, "efficientnet_b0": 1280, "bit_resnet": 2048}


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each pair of rows, computed here (not with the code under test)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def standin_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[standins.Build]:
    """The Keras 3 stand-ins, exported once in a subprocess that runs while the first tests do."""
    build = standins.Build(tmp_path_factory.mktemp("standins"))
    yield build
    build.stop()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where converted models are cached (CACHE_DIR/converted/), shared by this module's tests."""
    return tmp_path_factory.mktemp("conversion-cache")


@pytest.fixture(scope="module")
def photos() -> Callable[[int], np.ndarray]:
    """Real photos as JPEG files, decoded and resized by the service's own image path."""
    files = [demo.jpeg(demo.photo(name)) for name in TEST_PHOTOS]

    def at(size: int) -> np.ndarray:
        return np.stack([images.prepare(data, size, 10**8)[0] for data in files])

    return at


@pytest.fixture(scope="module")
def load(models_dir: Path, request: pytest.FixtureRequest) -> Callable[[str], Encoder]:
    """Each architecture loaded once through `Encoder` (a stand-in waits for its export)."""
    loaded: dict[str, Encoder] = {}

    def get(name: str) -> Encoder:
        if name not in loaded:
            if name == "mobilenet_v2":
                source = encoders.offline_source(models_dir)
                path = Path(source.location)
            else:
                path = request.getfixturevalue("standin_build").wait()[name]
                source = standins.source(path)
            loaded[name] = Encoder(source, path)
        return loaded[name]

    return get


@pytest.mark.slow  # three Keras models built in subprocesses
@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0", "bit_resnet"])
def test_each_architecture_converts_and_litert_agrees_with_tensorflow_on_photos(
    name: str,
    standin_build: standins.Build,  # started by the first case, exported while MobileNetV2 runs
    load: Callable[[str], Encoder],
    cache_dir: Path,
    photos: Callable[[int], np.ndarray],
    request: pytest.FixtureRequest,
) -> None:
    encoder = load(name)
    assert encoder.dim == DIMS[name] and encoder.runtime == "tensorflow"

    verified = convert.prepare(encoder, cache_dir, runtime="litert", min_cosine=MIN_COSINE)

    assert isinstance(verified.converted, litert.LiteEncoder), verified.runtime
    assert verified.active is verified.converted
    runtime = verified.runtime
    assert runtime["name"] == "litert" and runtime["checked_samples"] == 8, runtime
    assert runtime["min_cosine_samples"] >= MIN_COSINE, runtime
    assert convert.model_path(verified, cache_dir).is_file()
    cached = [p.name for p in (cache_dir / "converted").glob("*.tflite")]
    assert any(name.startswith(encoder.fingerprint) for name in cached), cached
    lite = verified.converted
    assert (lite.input_size, lite.dim) == (encoder.input_size, encoder.dim)

    batch = photos(encoder.input_size)
    reference, candidate = encoder.raw(batch), lite.raw(batch)
    cosines = row_cosines(reference, candidate)
    request.node.user_properties.append(("1 - cosine", [f"{1 - c:.1e}" for c in cosines]))
    assert np.all(np.isfinite(candidate)) and np.all(cosines >= MIN_COSINE), cosines
    # The photos get different vectors, and the converted model reproduces those differences
    # (not only the part every image shares).
    unit = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    assert (unit @ unit.T)[~np.eye(len(batch), dtype=bool)].min() < 0.99
    centre = reference.mean(axis=0)
    assert np.all(row_cosines(reference - centre, candidate - centre) >= 0.999)

    # A job's path: its first images go through both runtimes, and LiteRT keeps serving.
    vectors = verified.encode(batch)
    assert verified.converted is lite
    assert verified.runtime["checked_images"] == len(batch)
    assert verified.runtime["min_cosine_images"] >= MIN_COSINE
    request.node.user_properties.append(("runtime", verified.runtime))
    assert np.allclose(vectors, lite.encode(batch), atol=1e-6)


def test_a_model_tflite_builtins_cannot_express_is_served_by_tensorflow(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, photos: Callable[[int], np.ndarray]
) -> None:
    source = standins.unconvertible(tmp_path_factory.mktemp("unconvertible") / "spectral")
    encoder = Encoder(source, Path(source.location))
    batch = photos(encoder.input_size)
    expected = encoder.encode(batch)  # TensorFlow runs it (Svd has a TensorFlow kernel)
    assert encoder.dim == 16 and np.all(np.isfinite(expected))
    # TFLite's built-in ops cannot express it: the converter itself refuses, naming the op.
    with pytest.raises(Exception, match="Svd"):
        convert.tflite_bytes(encoder)

    verified = convert.prepare(encoder, cache_dir, runtime="litert", min_cosine=MIN_COSINE)

    assert verified.converted is None and verified.active is encoder
    runtime = verified.runtime
    assert set(runtime) == {"name", "reason"} and runtime["name"] == "tensorflow", runtime
    assert runtime["reason"].startswith("conversion to TFLite failed: "), runtime
    assert "Svd" in runtime["reason"], runtime  # the op TFLite lacks, not some other failure
    assert not list((cache_dir / "converted").glob(f"{encoder.fingerprint}-*.tflite"))
    vectors = verified.encode(batch)
    assert np.allclose(vectors, expected, atol=1e-6)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)


class Disagreeing:
    """A real LiteEncoder whose vectors are pushed off TensorFlow's (cosine about 0.98)."""

    def __init__(self, inner: litert.LiteEncoder) -> None:
        self.inner = inner
        self.input_size, self.dim = inner.input_size, inner.dim
        self.direction = np.random.default_rng(0).standard_normal(inner.dim).astype(np.float32)
        self.direction /= np.linalg.norm(self.direction)
        self.calls = 0

    def raw(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        out = self.inner.raw(batch)
        return out + 0.2 * np.linalg.norm(out, axis=1, keepdims=True) * self.direction

    def encode(self, batch: np.ndarray) -> np.ndarray:
        out = self.raw(batch)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_a_converted_model_that_disagrees_on_the_jobs_images_falls_back_to_tensorflow(
    load: Callable[[str], Encoder], cache_dir: Path, photos: Callable[[int], np.ndarray]
) -> None:
    encoder = load("mobilenet_v2")
    verified = convert.prepare(encoder, cache_dir, runtime="litert", min_cosine=MIN_COSINE)
    assert isinstance(verified.converted, litert.LiteEncoder), verified.runtime  # it passed its samples
    wrong = Disagreeing(verified.converted)
    verified.converted = wrong  # from here on it disagrees
    batch = photos(encoder.input_size)
    first, later = batch[:4], batch[4:]
    reference = encoder.raw(first)
    assert row_cosines(reference, wrong.raw(first)).max() < MIN_COSINE
    calls = wrong.calls

    vectors = verified.encode(first)

    assert np.allclose(vectors, reference / np.linalg.norm(reference, axis=1, keepdims=True), atol=1e-5)
    assert wrong.calls == calls + 1  # it was checked on these images, then dropped
    assert verified.converted is None and verified.active is encoder
    runtime = verified.runtime
    assert set(runtime) == {"name", "reason"} and runtime["name"] == "tensorflow", runtime
    assert "disagreed with TensorFlow on the job's images" in runtime["reason"], runtime

    again = verified.encode(later)
    assert wrong.calls == calls + 1  # later batches never reach the converted model
    assert np.allclose(again, encoder.encode(later), atol=1e-5)
    assert verified.runtime == runtime


def test_a_pass_alone_on_the_machine_runs_on_every_core_and_answers_the_same(
    load: Callable[[str], Encoder],
    cache_dir: Path,
    photos: Callable[[int], np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # A web worker's interpreter runs on its share of the cores (here 1 of 4); a pass that finds
    # no other running on the machine (core/inflight.py) takes all 4, and answers the same.
    verified = convert.prepare(load("mobilenet_v2"), cache_dir, runtime="litert", min_cosine=MIN_COSINE)
    path = convert.model_path(verified, cache_dir)
    monkeypatch.setattr(litert.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(litert, "_threads", 1)
    batch = photos(verified.input_size)[:2]

    monkeypatch.setattr(litert, "_lone_all_cores", False)  # LONE_PASS_ALL_CORES=0, or a job's child
    assert litert.LiteEncoder(path, {})._lone_threads == 0

    monkeypatch.setattr(litert, "_lone_all_cores", True)
    shared = litert.LiteEncoder(path, {})
    with inflight.forward():  # another worker's pass runs meanwhile: this one keeps to its thread
        crowded = shared.raw(batch)
    assert shared._lone is None
    alone = shared.raw(batch)
    assert shared._lone is not None and shared._lone_threads == 4
    assert np.allclose(alone, crowded, atol=1e-5), np.abs(alone - crowded).max()

    # The all-core interpreter is made at the first lone pass: if it cannot be (the model's file
    # evicted from the cache since it loaded), the pass runs on the usual one, and answers.
    copy = tmp_path / "encoder.tflite"
    copy.write_bytes(path.read_bytes())
    evicted = litert.LiteEncoder(copy, {})
    copy.unlink()
    assert np.allclose(evicted.raw(batch), crowded, atol=1e-5)
    assert evicted._lone is None and evicted._lone_threads == 0  # and it stops trying
