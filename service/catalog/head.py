"""The fine-tuned feature-vector head: trained on a version's labels, saved with it, run in NumPy.

Input: the backbone's unit vector and a 16x16 colour thumbnail of the same encoder input (the
layout and colour that ImageNet features mostly discard). Layers: an optional hidden ReLU
layer, then the feature-vector layer (the embedding, L2-normalised). Training adds a cosine
softmax classifier over the labels with an additive margin (CosFace), which pulls each label's
embeddings together: what nearest-neighbour search needs. Only the head trains; backbone
vectors are computed once (plus once for mirrored images when augmenting).

Saved as `head.json` (definition) + `head.npz` (weights, loaded with allow_pickle=False) and run
in NumPy at inference: a few matrix products, no second TensorFlow model per version.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.core.endpoint import HeadConfig
from service.core.vectors import normalise

if TYPE_CHECKING:
    from service.encoders import Encoder

log = logging.getLogger(__name__)

HEAD_FILES = ("head.json", "head.npz")
BACKBONE_SCALE = 30.0  # puts the unit backbone vector on the scale of the standardised thumbnail


def thumbnails(batch: np.ndarray, side: int) -> np.ndarray:
    """[N, side*side*3] box-filtered thumbnails (values in [0, 1]) of a [N, S, S, 3] uint8 batch."""
    n, size = batch.shape[0], batch.shape[1]
    batch = batch.astype(np.float32) / 255.0 if batch.dtype == np.uint8 else batch
    if side <= 0:
        return np.zeros((n, 0), np.float32)
    if size % side == 0:
        step = size // side
        small = batch.reshape(n, side, step, side, step, 3).mean(axis=(2, 4))
    else:  # sizes that do not divide: average over the nearest block edges
        edges = np.linspace(0, size, side + 1).astype(int)
        small = np.stack(
            [
                np.stack(
                    [
                        batch[:, a:b, c:d].mean(axis=(1, 2))
                        for c, d in zip(edges[:-1], edges[1:], strict=True)
                    ],
                    1,
                )
                for a, b in zip(edges[:-1], edges[1:], strict=True)
            ],
            1,
        )
    return small.reshape(n, -1).astype(np.float32)


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
        np.savez(folder / "head.npz", **self.weights)

    @classmethod
    def load(cls, folder: Path) -> Head:
        definition = json.loads((folder / "head.json").read_text())
        with np.load(folder / "head.npz", allow_pickle=False) as data:
            weights = {name: data[name] for name in data.files}
        return cls(definition, weights)


class HeadEncoder:
    """Backbone + head, with the Encoder's interface: what a fine-tuned version queries with."""

    def __init__(self, backbone: Encoder, head: Head) -> None:
        self.backbone = backbone
        self.head = head
        self.input_size = backbone.input_size
        self.dim = head.dim

    def encode(self, batch: np.ndarray) -> np.ndarray:
        return self.head.embed(self.backbone.encode(batch), thumbnails(batch, self.head.thumbnail))

    def describe(self) -> dict[str, Any]:
        return {**self.backbone.describe(), "head": self.head.fingerprint}


@dataclass
class TrainingData:
    """What the head trains on: backbone unit vectors, thumbnails, label ids; mirrored copies."""

    backbone: np.ndarray
    thumbs: np.ndarray
    labels: np.ndarray
    mirrored_backbone: np.ndarray | None = None
    mirrored_thumbs: np.ndarray | None = None


def train_head(data: TrainingData, label_names: list[str], config: HeadConfig) -> tuple[Head, dict[str, Any]]:
    """Train the head (early stopping on a stratified validation split); return it and a summary."""
    from service.encoders import tfruntime

    tf = tfruntime.tensorflow()
    import tf_keras as keras

    keras.utils.set_random_seed(config.seed)
    n_labels = len(label_names)
    train_idx, val_idx = stratified_split(data.labels, 0.1, config.seed)
    thumb_mean = data.thumbs[train_idx].mean(axis=0) if config.thumbnail else np.zeros(0, np.float32)
    thumb_std = data.thumbs[train_idx].std(axis=0) + 1e-3 if config.thumbnail else np.zeros(0, np.float32)
    definition = {
        **asdict(config),
        "backbone_dim": int(data.backbone.shape[1]),
        "labels": label_names,
        "inputs": "unit backbone vector x 30, standardised box thumbnail of the encoder input",
    }
    shell = Head(
        definition, {"thumb_mean": thumb_mean.astype(np.float32), "thumb_std": thumb_std.astype(np.float32)}
    )

    x = shell.inputs(data.backbone, data.thumbs)
    y = data.labels
    x_train, y_train = x[train_idx], y[train_idx]
    if config.augment and data.mirrored_backbone is not None and data.mirrored_thumbs is not None:
        mirrored = shell.inputs(data.mirrored_backbone, data.mirrored_thumbs)
        x_train = np.concatenate([x_train, mirrored[train_idx]])
        y_train = np.concatenate([y_train, y[train_idx]])

    inputs = keras.Input((x.shape[1],))
    h = keras.layers.Dropout(0.2)(inputs)
    if config.hidden_dim:
        h = keras.layers.Dense(config.hidden_dim, activation="relu", name="hidden")(h)
        h = keras.layers.Dropout(0.2)(h)
    features = keras.layers.Dense(config.feature_dim, name="feature")(h)
    unit = keras.layers.UnitNormalization()(features)
    cosine = keras.layers.Dense(
        n_labels, use_bias=False, name="classes", kernel_constraint=keras.constraints.UnitNorm(axis=0)
    )(unit)
    model = keras.Model(inputs, cosine)

    def cosface_loss(labels: Any, cosines: Any) -> Any:
        onehot = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), n_labels)
        logits = config.scale * (cosines - config.margin * onehot)
        return tf.nn.softmax_cross_entropy_with_logits(onehot, logits)

    model.compile(keras.optimizers.Adam(1e-3), loss=cosface_loss)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=6, restore_best_weights=True)
    history = model.fit(
        x_train,
        y_train,
        validation_data=(x[val_idx], y[val_idx]),
        epochs=config.max_epochs,
        batch_size=128,
        shuffle=True,
        verbose=0,
        callbacks=[stop],
    )
    weights = dict(shell.weights)
    if config.hidden_dim:
        weights["hidden_w"], weights["hidden_b"] = model.get_layer("hidden").get_weights()
    weights["feature_w"], weights["feature_b"] = model.get_layer("feature").get_weights()
    epochs = len(history.history["loss"])
    summary = {
        "epochs": epochs,
        "train_images": int(len(train_idx)),
        "validation_images": int(len(val_idx)),
        "augmented": bool(len(x_train) > len(train_idx)),
        "best_val_loss": round(float(min(history.history["val_loss"])), 4),
    }
    log.info("trained head: %s", summary)
    return Head(definition, {k: np.asarray(v, np.float32) for k, v in weights.items()}), summary


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) indices: about `fraction` of each label held out, at least one, never all."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_held = min(max(1, round(len(members) * fraction)), len(members) - 1) if len(members) > 1 else 0
        held.extend(members[:n_held])
        keep.extend(members[n_held:])
    return np.sort(np.array(keep, dtype=int)), np.sort(np.array(held, dtype=int))
