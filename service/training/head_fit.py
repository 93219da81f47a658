"""Fit a feature-vector head (service/catalog/head.py) with tf_keras: a cosine-softmax classifier with
an additive margin over the labels (CosFace by default, ArcFace by `[head] loss`), on stored backbone
vectors and thumbnails, stopped early on the held-out rows' retrieval score (or loss: `[head] stop_on`)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from service.catalog.evaluation import evaluate, exact_search
from service.catalog.head import Head
from service.core.endpoint import HEAD_STOPS, HeadConfig

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """What the head trains on: backbone unit vectors, thumbnails, label ids; and augmented copies
    of the same images ((backbone, thumbnails) each, row for row: the mirrored images, and in the
    bench other augmentations) that join the training rows when `augment` is on."""

    backbone: np.ndarray
    thumbs: np.ndarray
    labels: np.ndarray
    copies: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


def train_head(data: TrainingData, label_names: list[str], config: HeadConfig) -> tuple[Head, dict[str, Any]]:
    """Train the head (early stopping on a stratified validation split); return it and a summary."""
    import tf_keras as keras

    if config.stop_on not in HEAD_STOPS:
        raise ValueError(f"head stop_on must be one of {', '.join(HEAD_STOPS)}, got {config.stop_on!r}")
    keras.utils.set_random_seed(config.seed)
    train_idx, val_idx = stratified_split(data.labels, 0.1, config.seed)
    shell = _shell(data, train_idx, label_names, config)
    x, y = shell.inputs(data.backbone, data.thumbs), data.labels
    x_train, y_train = x[train_idx], y[train_idx]
    if config.augment and data.copies:
        x_train = np.concatenate([x_train, *(shell.inputs(b, t)[train_idx] for b, t in data.copies)])
        y_train = np.concatenate([y_train] + [y[train_idx]] * len(data.copies))
    model = _model(x.shape[1], len(label_names), config)
    # A retrieval score of a few held-out rows is mostly noise (and ties from the first epoch on):
    # small catalogues stop on the loss.
    stop_on = "retrieval" if config.stop_on == "retrieval" and len(val_idx) >= MIN_CHECK_QUERIES else "loss"
    if stop_on == "loss":
        stop = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=config.patience, restore_best_weights=True
        )
    else:
        stop = _retrieval_stop(x, y, train_idx, val_idx, config)
    # Batches of 128, smaller for small catalogues so that an epoch is still ~32 steps (with few
    # steps per epoch, the learning rate that suits thousands of images would barely move the head)
    batch = int(np.clip(len(x_train) // 32, 16, 128))
    fit = {
        "epochs": config.max_epochs,
        "batch_size": batch,
        "shuffle": True,
        "verbose": 0,
        "callbacks": [stop],
    }
    history = model.fit(x_train, y_train, validation_data=(x[val_idx], y[val_idx]), **fit)
    summary = {
        "epochs": len(history.history["loss"]),
        "train_images": int(len(train_idx)),
        "validation_images": int(len(val_idx)),
        "augmented": bool(len(x_train) > len(train_idx)),
        "training_rows": int(len(x_train)),  # the train split and its augmented copies
        "batch_size": batch,
        "best_val_loss": round(float(min(history.history["val_loss"])), 4),
        "stop_on": stop_on,
    }
    if stop_on == "retrieval":  # the kept epoch's
        summary |= {
            "best_epoch": stop.best_epoch + 1,
            "best_val_map@10": stop.best[0],
            "best_val_loss": -stop.best[1],
        }
    log.info("trained head: %s", summary)
    return Head(shell.definition, _weights(model, shell, config)), summary


# Early stopping on retrieval scores at most this many held-out rows, searched against at most this
# many training rows (samples beyond): an epoch's check costs the same at 10,000 images as at a million.
# With fewer held-out rows than the minimum, it stops on the loss.
MIN_CHECK_QUERIES = 50
MAX_CHECK_QUERIES = 1_000
MAX_CHECK_DATABASE = 20_000


def check_rows(train_idx: np.ndarray, val_idx: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(queries, database): the held-out and training rows the retrieval check uses, samples of
    them beyond MAX_CHECK_QUERIES and MAX_CHECK_DATABASE."""
    rng = np.random.default_rng(seed)
    return (
        np.sort(rng.permutation(val_idx)[:MAX_CHECK_QUERIES]),
        np.sort(rng.permutation(train_idx)[:MAX_CHECK_DATABASE]),
    )


def _retrieval_stop(
    x: np.ndarray, labels: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, config: HeadConfig
) -> Any:
    """A Keras callback: after each epoch, the mAP@10 of held-out rows searched (exactly) against the
    training rows with the head's embedding, what the index will serve; training stops after
    `patience` epochs without a better one and keeps the best epoch's weights. Equal scores go to
    the lower validation loss (a catalogue easy enough to score 1.0 from the first epoch still
    trains). The margin loss alone is a poor stand-in: on Fashion-MNIST it bottomed out at epoch 3
    of a head whose mAP@10 rose until epoch 15."""
    import tf_keras as keras

    queries, database = check_rows(train_idx, val_idx, config.seed)
    rows = x[np.concatenate([database, queries])]  # gathered once, not every epoch

    class RetrievalStop(keras.callbacks.Callback):
        best, best_epoch, weights = (-1.0, -math.inf), 0, None

        def on_train_begin(self, logs: Any = None) -> None:
            self.embedding = keras.Model(self.model.input, self.model.get_layer("classes").input)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            vectors = self.embedding.predict(rows, batch_size=2048, verbose=0)
            db, q = vectors[: len(database)], vectors[len(database) :]
            found = evaluate(exact_search(db), labels[database], q, labels[queries])["map@10"]
            score = (found, -round(float((logs or {})["val_loss"]), 4))
            if self.weights is None or score > self.best:  # the first epoch's, even if NaN
                self.best, self.best_epoch, self.weights = score, epoch, self.model.get_weights()
            elif epoch - self.best_epoch >= config.patience:
                self.model.stop_training = True

        def on_train_end(self, logs: Any = None) -> None:
            if self.weights is not None:
                self.model.set_weights(self.weights)

    return RetrievalStop()


def _shell(data: TrainingData, train_idx: np.ndarray, label_names: list[str], config: HeadConfig) -> Head:
    """A head with its definition and input standardisation, before any weight is trained."""
    thumb_mean = data.thumbs[train_idx].mean(axis=0) if config.thumbnail else np.zeros(0, np.float32)
    thumb_std = data.thumbs[train_idx].std(axis=0) + 1e-3 if config.thumbnail else np.zeros(0, np.float32)
    definition = {
        **asdict(config),
        "backbone_dim": int(data.backbone.shape[1]),
        "labels": label_names,
        "inputs": "unit backbone vector x 30, standardised box thumbnail of the encoder input",
    }
    return Head(
        definition, {"thumb_mean": thumb_mean.astype(np.float32), "thumb_std": thumb_std.astype(np.float32)}
    )


def _model(width: int, n_labels: int, config: HeadConfig) -> Any:
    """The head (dropout, optional hidden ReLU layer, feature layer, unit length) with a cosine
    classifier over the labels on top, compiled with the configured margin loss."""
    import tf_keras as keras

    inputs = keras.Input((width,))
    h = keras.layers.Dropout(0.2)(inputs)
    if config.hidden_dim:
        h = keras.layers.Dense(config.hidden_dim, activation="relu", name="hidden")(h)
        h = keras.layers.Dropout(0.2)(h)
    unit = keras.layers.UnitNormalization()(keras.layers.Dense(config.feature_dim, name="feature")(h))
    cosine = keras.layers.Dense(
        n_labels, use_bias=False, name="classes", kernel_constraint=keras.constraints.UnitNorm(axis=0)
    )(unit)
    model = keras.Model(inputs, cosine)
    losses = {"cosface": CosFaceLoss, "arcface": ArcFaceLoss}
    if config.loss not in losses:
        raise ValueError(f"head loss must be one of {', '.join(losses)}, got {config.loss!r}")
    loss = losses[config.loss](n_labels, config.scale, config.margin)
    model.compile(keras.optimizers.Adam(config.learning_rate), loss=loss)
    return model


class CosFaceLoss:
    """Softmax cross-entropy over scaled cosines, the right label's cosine less an additive margin."""

    def __init__(self, n_labels: int, scale: float, margin: float) -> None:
        from service.encoders import tfruntime

        self.n_labels, self.scale, self.margin = n_labels, scale, margin
        self.tf = tfruntime.tensorflow()  # here, not in __call__: autograph traces that

    def __call__(self, labels: Any, cosines: Any) -> Any:
        tf = self.tf
        onehot = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), self.n_labels)
        logits = self.scale * (cosines - self.margin * onehot)
        return tf.nn.softmax_cross_entropy_with_logits(onehot, logits)


class ArcFaceLoss(CosFaceLoss):
    """Softmax cross-entropy over scaled cosines, the right label's angle plus an additive margin
    (Deng et al., CVPR 2019). Past an angle of pi - margin, cos(angle + margin) would rise again
    and push a row away from its label, so there (as in the paper's code) the cosine less
    margin * sin(margin) is used instead. Measured against CosFace in docs/BENCHMARKS.md."""

    def __call__(self, labels: Any, cosines: Any) -> Any:
        tf = self.tf
        onehot = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), self.n_labels)
        cosines = tf.clip_by_value(cosines, -1.0 + 1e-6, 1.0 - 1e-6)  # acos' gradient is infinite at ±1
        with_margin = tf.cos(tf.acos(cosines) + self.margin)
        fallback = cosines - self.margin * math.sin(self.margin)
        target = tf.where(cosines > math.cos(math.pi - self.margin), with_margin, fallback)
        logits = self.scale * tf.where(onehot > 0, target, cosines)
        return tf.nn.softmax_cross_entropy_with_logits(onehot, logits)


def _weights(model: Any, shell: Head, config: HeadConfig) -> dict[str, np.ndarray]:
    weights = dict(shell.weights)
    if config.hidden_dim:
        weights["hidden_w"], weights["hidden_b"] = model.get_layer("hidden").get_weights()
    weights["feature_w"], weights["feature_b"] = model.get_layer("feature").get_weights()
    return {k: np.asarray(v, np.float32) for k, v in weights.items()}


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) indices: about `fraction` of each label held out, at least one, never all."""
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    held: list[int] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_held = min(max(1, round(len(members) * fraction)), len(members) - 1) if len(members) > 1 else 0
        held.extend(members[:n_held])
        keep.extend(members[n_held:])
    return np.sort(np.array(keep, dtype=np.int64)), np.sort(np.array(held, dtype=np.int64))
