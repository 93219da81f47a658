"""The fine-tuned head inside the converted model: one TFLite graph per version, so a query is one invoke.

The graph takes the encoder's uint8 input and returns, side by side in one row, the head's unit
vector (the indexed embedding) and the backbone's raw vector (what duplicates are judged on):
backbone, thumbnail (average pooling = the NumPy box filter), standardisation, the hidden and
feature layers and the normalisation, all built-in ops. It is made once per trained head, by the
job that trained it (TensorFlow is loaded there anyway), and checked like the backbone's
conversion: on sample inputs and the job's own images, against the TensorFlow backbone with the
NumPy head, cosine >= the conversion's minimum for both parts. A head that cannot be fused (a
thumbnail that does not divide the input, a model that will not convert or agree) is served by
the NumPy head as before; the version's `runtime` says which and why.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from service.catalog.head import BACKBONE_SCALE, FUSED_FILE, Head, HeadEncoder, thumbnails
from service.encoders import Encoder, convert, litert, tfruntime

log = logging.getLogger(__name__)

MAX_DIFFERENCE = 1e-4  # the most any value of a fused vector may differ from the NumPy head's


def fused_bytes(encoder: Encoder, head: Head) -> bytes:
    """The backbone and the head as one float32 TFLite model: uint8 [N, S, S, 3] in,
    [N, head dim + backbone dim] out (the head's unit vector, then the backbone's raw vector)."""
    tf = tfruntime.tensorflow()
    for noisy in ("absl", "tensorflow"):  # the converter logs every renamed input
        logging.getLogger(noisy).setLevel(logging.WARNING)
    size, side = encoder.input_size, head.thumbnail
    if side and size % side:
        raise ValueError(f"a {side}x{side} thumbnail of {size}px inputs averages uneven blocks")
    weights = {name: tf.constant(value) for name, value in head.weights.items()}
    layer = encoder.layer

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
    def forward(batch: Any) -> Any:
        pixels = tf.cast(batch, tf.float32) / 255.0
        backbone = layer(pixels)
        norm = tf.sqrt(tf.reduce_sum(backbone * backbone, axis=1, keepdims=True))
        parts = [backbone / tf.maximum(norm, 1e-12) * BACKBONE_SCALE]
        if side:
            step = size // side
            thumbs = tf.nn.avg_pool2d(pixels, step, step, "VALID")
            flat = tf.reshape(thumbs, [-1, side * side * 3])
            parts.append((flat - weights["thumb_mean"]) / weights["thumb_std"])
        x = tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]
        if "hidden_w" in weights:
            x = tf.nn.relu(tf.matmul(x, weights["hidden_w"]) + weights["hidden_b"])
        feature = tf.matmul(x, weights["feature_w"]) + weights["feature_b"]
        length = tf.sqrt(tf.reduce_sum(feature * feature, axis=1, keepdims=True))
        return tf.concat([feature / tf.maximum(length, 1e-12), backbone], axis=1)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([forward.get_concrete_function()], layer)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return bytes(converter.convert())


def fuse(
    encoder: convert.Verified, head: Head, checks: np.ndarray, folder: Path, min_cosine: float
) -> tuple[Path | None, dict[str, Any]]:
    """Fuse `head` with the job's encoder into `folder`/head.tflite and check it on sample inputs
    plus `checks` (the job's first images, encoder inputs). Returns the file (None: not fused)
    and the runtime entry's `head` part (how, or why not)."""
    if encoder.converted is None:
        return None, {"fused": False, "reason": "the backbone runs on TensorFlow"}
    try:
        path = folder / FUSED_FILE
        path.write_bytes(fused_bytes(encoder.reference, head))
        fused = litert.LiteEncoder(path, {"fingerprint": f"{encoder.fingerprint}+{head.fingerprint}"})
        inputs = convert.sample_inputs(encoder.input_size)
        if len(checks):
            inputs = np.concatenate([inputs, checks])
        out = fused.rows(inputs)
        worst = worst_agreement(out, encoder.reference, head, inputs)
        # Against what would serve without it (the converted backbone, the NumPy head): the same
        # scores to 1e-4, not only the same directions
        served = HeadEncoder(encoder.converted, head).encode(inputs)
        difference = float(np.abs(out[:, : head.dim] - served).max())
    except Exception as exc:  # the converter raises many types; a foreign model may not trace
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        reason = f"the head could not be fused: {type(exc).__name__}: {first_line}"
        log.warning("%s", reason)
        return None, {"fused": False, "reason": reason}
    if worst < min_cosine or not difference <= MAX_DIFFERENCE:
        reason = (
            f"the fused model disagreed with the NumPy head (cosine {worst:.6f}, min {min_cosine}; "
            f"largest difference {difference:.2e}, max {MAX_DIFFERENCE:g})"
        )
        log.warning("%s", reason)
        return None, {"fused": False, "reason": reason}
    entry = {"fused": True, "checked_images": int(len(inputs)), "min_cosine": round(worst, 7)}
    return path, {**entry, "max_difference": float(f"{difference:.2e}")}


def worst_agreement(out: np.ndarray, backbone: Encoder, head: Head, inputs: np.ndarray) -> float:
    """The least cosine, over `inputs`, between the fused model's rows `out` (both parts) and the
    reference's: the TensorFlow backbone, and the NumPy head on it."""
    reference = backbone.raw(inputs)
    feature = head.embed(reference, thumbnails(inputs, head.thumbnail))
    return min(
        convert.worst_cosine(feature, out[:, : head.dim]),
        convert.worst_cosine(reference, out[:, head.dim :]),
    )
