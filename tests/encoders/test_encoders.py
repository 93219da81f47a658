"""Encoders: the real loading path (hub.KerasLayer) for SavedModel folders, TF-Hub URL handles
(downloaded once into the cache) and the offline encoder; clear errors when one cannot be had."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import demo
from service import encoders
from service.catalog.images import to_input
from service.core.endpoint import EncoderSpec
from service.core.errors import EncoderUnavailableError
from service.encoders import EncoderSource
from tests.helpers import ModelServer


def inputs(size: int, *names: str) -> np.ndarray:
    return np.stack([to_input(demo.photo(n), size) for n in names])


def test_a_local_saved_model_loads_through_hub_keras_layer(tiny_model: Path, tmp_path: Path) -> None:
    source = EncoderSource("saved_model", str(tiny_model), 32)
    encoder = encoders.load(source, tmp_path / "hub")
    assert type(encoder.layer).__name__ == "KerasLayer"
    vectors = encoder.encode(inputs(32, "coffee", "rocket"))
    assert vectors.shape == (2, 16)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])


def test_the_offline_encoder_gives_real_feature_vectors(models_dir: Path, tmp_path: Path) -> None:
    encoder = encoders.load(encoders.offline_source(models_dir), tmp_path / "hub")
    assert (encoder.dim, encoder.input_size) == (1280, 160)
    vectors = encoder.encode(inputs(160, "chelsea", "cat", "coffee", "rocket"))
    similarity = vectors @ vectors.T
    assert similarity[0, 1] == pytest.approx(1.0, abs=1e-5)  # chelsea and cat: the same photo
    assert similarity[0, 2] < 0.5 and similarity[2, 3] < 0.5  # different photos stay apart
    # A batch gives the same vectors as one image at a time.
    one = encoder.encode(inputs(160, "coffee"))
    assert np.allclose(one[0], vectors[2], atol=1e-4)


def test_encode_refuses_the_wrong_input_shape(tiny_model: Path, tmp_path: Path) -> None:
    encoder = encoders.load(EncoderSource("saved_model", str(tiny_model), 32), tmp_path / "hub")
    with pytest.raises(ValueError, match=r"expected uint8 \[N, 32, 32, 3\]"):
        encoder.encode(np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="got float32"):
        encoder.encode(np.zeros((1, 32, 32, 3), np.float32))


@pytest.mark.parametrize(
    ("source", "mode", "kind"),
    [
        ("https://tfhub.dev/google/bit/m-r50x1/1", "offline", "offline"),
        ("https://tfhub.dev/google/bit/m-r50x1/1", "hub", "hub"),
        ("/srv/models/mine", "offline", "saved_model"),
        ("offline", "hub", "offline"),
    ],
)
def test_resolve_maps_remote_handles_to_the_offline_encoder_only_in_offline_mode(
    source: str, mode: str, kind: str
) -> None:
    resolved = encoders.resolve(EncoderSpec(source, 224), mode, Path("/models"))
    assert resolved.kind == kind
    if kind == "offline":
        assert resolved.input_size == encoders.OFFLINE_INPUT_SIZE


def test_a_url_handle_is_downloaded_into_the_cache_and_loaded(
    model_server: ModelServer, tmp_path: Path
) -> None:
    cache = tmp_path / "tfhub-cache"
    encoder = encoders.load(EncoderSource("hub", model_server.url, 32), cache)
    assert type(encoder.layer).__name__ == "KerasLayer"
    assert encoder.encode(inputs(32, "coffee")).shape == (1, 16)
    downloaded = [p for p in cache.iterdir() if p.is_dir()]
    assert len(downloaded) == 1 and (downloaded[0] / "saved_model.pb").is_file()


def test_a_cached_handle_is_not_downloaded_again(model_server: ModelServer, tmp_path: Path) -> None:
    cache = tmp_path / "tfhub-cache"
    first = encoders.fetch_handle(model_server.url, cache)
    model_server.stop()  # from now on the handle's host refuses connections
    assert encoders.fetch_handle(model_server.url, cache) == first
    with pytest.raises(EncoderUnavailableError):
        encoders.fetch_handle(model_server.url, tmp_path / "empty-cache")


def test_an_unreachable_handle_names_it_and_how_to_work_offline(tmp_path: Path) -> None:
    handle = "http://127.0.0.1:9/imagenet/mobilenet_v2/feature_vector.tar.gz"
    with pytest.raises(EncoderUnavailableError) as info:
        encoders.load(EncoderSource("hub", handle, 224), tmp_path / "cache")
    message = info.value.message
    assert handle in message
    assert "TFHUB_CACHE_DIR" in message and "ENCODER_MODE=offline" in message


def test_a_missing_saved_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EncoderUnavailableError, match="No SavedModel at"):
        encoders.load(EncoderSource("saved_model", str(tmp_path / "nothing"), 32), tmp_path)
