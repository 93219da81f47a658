"""Convert a TensorFlow encoder to TFLite for LiteRT, and prove the conversion on real inputs.

A training job loads the endpoint's TF-Hub model with TensorFlow (the source of every model), then
converts it once per instance (cached by the encoder's fingerprint under CACHE_DIR/converted/).
The converted model must agree with TensorFlow, vector by vector (cosine >= CONVERTED_MIN_COSINE,
0.9999 by default): first on synthetic sample images at conversion, then on the job's own first
images, which `Verified` runs through both runtimes. A model that fails to convert or to agree
is not used: the job embeds with TensorFlow and the version is served by TensorFlow, and its
manifest says why (`runtime`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.core.errors import EncoderUnavailableError
from service.core.vectors import normalise
from service.encoders import Encoder, litert, tfruntime
from service.storage.versions import sha256_file

log = logging.getLogger(__name__)

MIN_COSINE = 0.9999
CHECK_IMAGES = 32  # the job's first images, embedded by both runtimes and compared


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] arrays (1.0 for two zero rows)."""
    a, b = normalise(reference), normalise(candidate)
    both_zero = (np.linalg.norm(reference, axis=1) == 0) & (np.linalg.norm(candidate, axis=1) == 0)
    return np.where(both_zero, 1.0, np.sum(a * b, axis=1))


def sample_inputs(size: int) -> np.ndarray:
    """Eight deterministic test images: noise, flat colours, gradients, a checkerboard, black, white."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    grad = np.stack(np.meshgrid(ramp, ramp[::-1]), -1)
    checker = ((np.add.outer(np.arange(size) // 8, np.arange(size) // 8) % 2) * 255).astype(np.uint8)
    images = [
        rng.integers(0, 256, (size, size, 3)),
        rng.integers(0, 256, (size // 8, size // 8, 3)).repeat(8, 0).repeat(8, 1)[:size, :size],
        np.broadcast_to([200, 30, 40], (size, size, 3)),
        np.broadcast_to([20, 120, 220], (size, size, 3)),
        np.concatenate([grad, grad[..., :1]], -1),
        np.stack([checker] * 3, -1),
        np.zeros((size, size, 3)),
        np.full((size, size, 3), 255),
    ]
    out = np.zeros((len(images), size, size, 3), np.uint8)
    for i, image in enumerate(images):
        pad = np.zeros((size, size, 3))
        pad[: image.shape[0], : image.shape[1]] = image
        out[i] = pad.astype(np.uint8)
    return out


def tflite_bytes(encoder: Encoder) -> bytes:
    """The encoder's forward pass (uint8 batch in, features out) as a float32 TFLite model."""
    tf = tfruntime.tensorflow()
    # The converter logs every renamed input (thousands of names) and its temporary SavedModel.
    for noisy in ("absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([encoder.forward_function], encoder.layer)
    # Built-in ops only: LiteRT runs them without TensorFlow (no Flex delegate); no quantisation.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return bytes(converter.convert())


def worst_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """The least cosine between the rows of two runtimes' outputs; -1 if any value is not finite
    (NaN compares false with every threshold, so it must never reach one)."""
    if not (np.isfinite(reference).all() and np.isfinite(candidate).all()):
        return -1.0
    found = cosines(reference, candidate)
    return float(found.min()) if len(found) and np.isfinite(found).all() else -1.0


def _cache_name(encoder: Encoder) -> str:
    # What the traced forward pass depends on besides the model: its input size and outputs.
    shape = {k: encoder.source.describe().get(k) for k in ("input_size", "signature", "output_key")}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:8]
    return f"{encoder.fingerprint}-{digest}-{litert.version()}.tflite"


def converted_file(encoder: Encoder, cache_dir: Path) -> Path:
    """The encoder's converted model on this instance, converting it once (under a lock). A cached
    file is used only while it matches the sha256 written beside it when it was made."""
    folder = cache_dir / "converted"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / _cache_name(encoder)
    digest_file = target.with_name(target.name + ".sha256")
    with open(folder / f"{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # worker processes on one instance convert once
        if (
            target.exists()
            and digest_file.exists()
            and sha256_file(target) == digest_file.read_text().strip()
        ):
            return target
        started = time.monotonic()
        data = tflite_bytes(encoder)
        tmp = target.with_suffix(f".{os.getpid()}.part")
        tmp.write_bytes(data)
        digest_file.write_text(hashlib.sha256(data).hexdigest())
        os.replace(tmp, target)  # complete or absent
        log.info(
            "converted encoder %s to TFLite in %.1fs (%d bytes)",
            encoder.fingerprint,
            time.monotonic() - started,
            len(data),
        )
    return target


def forget(encoder: Encoder, cache_dir: Path) -> None:
    """Drop a cached conversion that failed to load or to agree: the next job converts afresh."""
    target = cache_dir / "converted" / _cache_name(encoder)
    target.unlink(missing_ok=True)
    target.with_name(target.name + ".sha256").unlink(missing_ok=True)


class Verified:
    """What a job embeds with: the converted model, checked against TensorFlow on the first images.

    The first CHECK_IMAGES images go through both; if any vector disagrees, those images keep
    TensorFlow's vectors and the rest of the job runs on TensorFlow (`runtime` says why).
    """

    def __init__(
        self,
        reference: Encoder,
        converted: litert.LiteEncoder | None,
        runtime: dict[str, Any],
        min_cosine: float,
        check_images: int = CHECK_IMAGES,
    ) -> None:
        self.reference = reference
        self.converted = converted
        self.input_size = reference.input_size
        self.dim = reference.dim
        self.fingerprint = reference.fingerprint
        self.min_cosine = min_cosine
        self.check_images = check_images
        self._runtime = runtime
        self._checked = 0
        self._worst = 1.0
        self._lock = threading.Lock()

    @property
    def active(self) -> Encoder | litert.LiteEncoder:
        return self.converted if self.converted is not None else self.reference

    @property
    def checked(self) -> int:
        """The job's images checked so far against TensorFlow."""
        with self._lock:
            return self._checked

    @property
    def runtime(self) -> dict[str, Any]:
        """The manifest's `runtime` entry: which runtime serves the version, and the evidence."""
        with self._lock:
            entry = dict(self._runtime)
            if self.converted is not None:
                entry["checked_images"] = self._checked
                entry["min_cosine_images"] = round(self._worst, 7) if self._checked else None
            return entry

    def describe(self) -> dict[str, Any]:
        return self.reference.describe()

    def check(self, batch: np.ndarray) -> np.ndarray | None:
        """Run `batch` (the job's images) through both runtimes; on a disagreement switch to
        TensorFlow for good. Returns TensorFlow's unit vectors if it switched, else LiteRT's."""
        converted = self.converted
        if converted is None or not len(batch):
            return None
        reference, candidate = self.reference.raw(batch), converted.raw(batch)
        worst = worst_cosine(reference, candidate)
        with self._lock:
            self._checked += len(batch)
            self._worst = min(self._worst, worst)
            if worst < self.min_cosine and self.converted is not None:
                self.converted = None
                self._runtime = {
                    "name": "tensorflow",
                    "reason": f"the converted model disagreed with TensorFlow on the job's images "
                    f"(cosine {worst:.6f} < {self.min_cosine})",
                }
                log.warning("converted encoder %s: %s", self.fingerprint, self._runtime["reason"])
        return normalise(reference if self.converted is None else candidate)

    def encode(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            converted, to_check = self.converted, self.check_images - self._checked
        if converted is None:
            return self.reference.encode(batch)
        if to_check <= 0:
            return converted.encode(batch)
        head, rest = batch[:to_check], batch[to_check:]
        head_vectors = self.check(head)
        assert head_vectors is not None  # a converted model and a non-empty batch
        if not len(rest):
            return head_vectors
        return np.concatenate([head_vectors, self.encode(rest)])


def prepare(encoder: Encoder, cache_dir: Path, runtime: str, min_cosine: float = MIN_COSINE) -> Verified:
    """Convert the encoder (once per instance) and check it on sample inputs; never raises for a
    model that will not convert: the answer then runs on TensorFlow and says why."""
    if runtime == "tensorflow":
        return Verified(
            encoder, None, {"name": "tensorflow", "reason": "ENCODER_RUNTIME=tensorflow"}, min_cosine
        )
    try:
        version = litert.version()
    except EncoderUnavailableError as exc:
        log.warning("encoder %s: %s", encoder.fingerprint, exc.message)
        return Verified(encoder, None, {"name": "tensorflow", "reason": exc.message}, min_cosine)
    try:
        path = converted_file(encoder, cache_dir)
        converted = litert.LiteEncoder(path, encoder.describe())
        if converted.input_size != encoder.input_size or converted.dim != encoder.dim:
            raise EncoderUnavailableError(
                f"the converted model maps {converted.input_size}px to {converted.dim}-d, "
                f"TensorFlow {encoder.input_size}px to {encoder.dim}-d"
            )
        samples = sample_inputs(encoder.input_size)
        worst = worst_cosine(encoder.raw(samples), converted.raw(samples))
    except Exception as exc:  # the converter raises many types (ConverterError, ValueError, ...)
        forget(encoder, cache_dir)
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        reason = f"conversion to TFLite failed: {type(exc).__name__}: {first_line}"
        log.warning("encoder %s: %s", encoder.fingerprint, reason)
        return Verified(encoder, None, {"name": "tensorflow", "reason": reason}, min_cosine)
    if worst < min_cosine:
        forget(encoder, cache_dir)
        reason = (
            "the converted model disagreed with TensorFlow on sample inputs "
            f"(cosine {worst:.6f} < {min_cosine})"
        )
        log.warning("encoder %s: %s", encoder.fingerprint, reason)
        return Verified(encoder, None, {"name": "tensorflow", "reason": reason}, min_cosine)
    entry = {
        "name": litert.RUNTIME,
        "file": litert.MODEL_FILE,
        "litert": version,
        "min_cosine": min_cosine,
        "checked_samples": len(samples),
        "min_cosine_samples": round(worst, 7),
    }
    return Verified(encoder, converted, entry, min_cosine)


def model_path(verified: Verified, cache_dir: Path) -> Path | None:
    """The converted file to publish with the version, or None when TensorFlow serves it."""
    if verified.converted is None:
        return None
    return converted_file(verified.reference, cache_dir)
