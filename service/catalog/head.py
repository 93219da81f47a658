"""The fine-tuned feature-vector head: trained on a version's labels, saved with it, run in NumPy.

Input: the backbone's unit vector and a 16x16 colour thumbnail of the same encoder input (the
layout and colour that ImageNet features mostly discard). Layers: an optional hidden ReLU
layer, then the feature-vector layer (the embedding, L2-normalised). Training adds a cosine
softmax classifier over the labels with an additive margin (CosFace, or ArcFace), which pulls each label's
embeddings together: what nearest-neighbour search needs. Only the head trains; backbone
vectors are computed once (plus once for mirrored images when augmenting).

Saved as `head.json` (definition) + `head.npz` (weights, loaded with allow_pickle=False) and run
in NumPy at inference: a few matrix products, no second TensorFlow model per version. Training it
(with tf_keras) is the training pipeline's: service/training/head_fit.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from service.core.vectors import normalise

if TYPE_CHECKING:
    from service.encoders import Embedder

log = logging.getLogger(__name__)

HEAD_FILES = ("head.json", "head.npz")
FUSED_FILE = "head.tflite"  # the backbone and this head in one converted model (training/fuse.py)
BACKBONE_SCALE = 30.0  # puts the unit backbone vector on the scale of the standardised thumbnail


def thumbnails(batch: np.ndarray, side: int) -> np.ndarray:
    """[N, side*side*3] box-filtered thumbnails (values in [0, 1]) of a [N, S, S, 3] uint8 batch."""
    n, size = batch.shape[0], batch.shape[1]
    if side <= 0:
        return np.zeros((n, 0), np.float32)
    # Block sums in two small matrix products (BLAS) per channel, then one division: 0.07 ms an
    # image where a mean over strided blocks took 0.5-0.6 (bench/perf.py, thumbnail_cost; training
    # computes one for every image). Sums of uint8 values are exact in float32, so a block of equal
    # pixels comes out exactly as the fused model's average pooling computes it.
    ones, area = _blocks(size, side)
    x = batch.astype(np.float32).transpose(0, 3, 1, 2)  # [N, 3, S, S]
    sums = ones.T @ (x @ ones)  # [N, 3, side, side]
    scale = np.float32(255) if batch.dtype == np.uint8 else np.float32(1)
    small = sums / (area * scale)
    return small.transpose(0, 2, 3, 1).reshape(n, side * side * 3).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _blocks(size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """[size, side] ones where row i falls in block j, and [side, side] the blocks' pixel counts.
    Blocks are equal where side divides size (all the fused model takes), else they run between
    the nearest whole pixels."""
    edges = np.linspace(0, size, side + 1).astype(int)
    ones = np.zeros((size, side), np.float32)
    for j, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        ones[a:b, j] = 1.0
    lengths = np.diff(edges).astype(np.float32)
    area = np.outer(lengths, lengths)
    ones.flags.writeable = area.flags.writeable = False
    return ones, area


class Head:
    """A trained head: definition plus weights; `embed` maps backbone vectors (+ thumbnails)."""

    def __init__(self, definition: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
        self.definition = definition
        self.weights = weights
        self.thumbnail = int(definition["thumbnail"])
        self.dim = int(definition["feature_dim"])

    def inputs(self, backbone: np.ndarray, thumbs: np.ndarray) -> np.ndarray:
        parts = [normalise(backbone) * BACKBONE_SCALE]
        if self.thumbnail:
            parts.append((thumbs - self.weights["thumb_mean"]) / self.weights["thumb_std"])
        return np.concatenate(parts, axis=1).astype(np.float32)

    def embed(self, backbone: np.ndarray, thumbs: np.ndarray) -> np.ndarray:
        x = self.inputs(backbone, thumbs)
        if "hidden_w" in self.weights:
            x = np.maximum(x @ self.weights["hidden_w"] + self.weights["hidden_b"], 0.0)
        return normalise(x @ self.weights["feature_w"] + self.weights["feature_b"])

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps(self.definition, sort_keys=True).encode())
        for name in sorted(self.weights):
            digest.update(np.ascontiguousarray(self.weights[name]).tobytes())
        return digest.hexdigest()[:16]

    def save(self, folder: Path) -> None:
        (folder / "head.json").write_text(json.dumps(self.definition, indent=1))
        np.savez(folder / "head.npz", **self.weights)  # type: ignore[arg-type]  # numpy stubs: kwargs

    @classmethod
    def load(cls, folder: Path) -> Head:
        return cls.from_files(folder / "head.json", folder / "head.npz")

    @classmethod
    def from_files(cls, definition: Path, weights: Path) -> Head:
        """A head from its two files (head.json, head.npz), wherever they are."""
        parsed = json.loads(definition.read_text())
        with np.load(weights, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        return cls(parsed, arrays)


class HeadEncoder:
    """Backbone + head, with the Encoder's interface: what a fine-tuned version queries with.

    With `fused` (the version's head.tflite, service/training/fuse.py: backbone and head in one
    graph whose rows are the head's unit vector then the backbone's raw vector) a batch is one
    invoke; without it, the backbone's invoke and the head in NumPy."""

    def __init__(self, backbone: Embedder, head: Head, fused: Fused | None = None) -> None:
        self.backbone = backbone
        self.head = head
        self.fused = fused
        self.input_size = backbone.input_size
        self.dim = head.dim

    def encode(self, batch: np.ndarray) -> np.ndarray:
        if self.fused is not None:
            return self.fused.rows(batch)[:, : self.dim]  # unit length already, in the graph
        return self.head.embed(self.backbone.encode(batch), thumbnails(batch, self.head.thumbnail))

    def encode_both(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The head's vectors and the backbone's unit vectors of a batch (duplicates need both)."""
        if self.fused is not None:
            out = self.fused.rows(batch)
            return out[:, : self.dim], normalise(out[:, self.dim :])
        backbone = self.backbone.encode(batch)
        return self.head.embed(backbone, thumbnails(batch, self.head.thumbnail)), backbone


class Fused(Protocol):
    """A converted model whose rows are not normalised (litert.LiteEncoder.rows)."""

    input_size: int
    dim: int

    def rows(self, batch: np.ndarray) -> np.ndarray: ...
