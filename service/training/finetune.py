"""Fine-tuning decisions: do the labels allow a head, train it, and keep it only if it helps.

A stratified sample of the labelled images is held out as queries; the rest is the database.
Both the frozen backbone and the trained head are scored on that split (precision@1,
precision@10, mAP@10, relevant = same label). `auto` keeps the head only if its precision@10
beats the frozen backbone's; `always` keeps it regardless; `never` does not train one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.catalog.evaluation import evaluate, exact_search
from service.catalog.head import Head
from service.core.endpoint import HeadConfig
from service.core.errors import TrainingError
from service.training.head_fit import TrainingData, stratified_split, train_head

MODES = ("auto", "always", "never")
DECIDING_METRIC = "precision@10"


def usable_labels(labels: list[str | None], config: HeadConfig) -> list[str]:
    """Labels with enough images to learn from (sorted); a head needs at least two."""
    counts = Counter(label for label in labels if label is not None)
    return sorted(label for label, n in counts.items() if n >= config.min_images_per_label)


def plan(mode: str, labels: list[str | None], config: HeadConfig) -> bool:
    """Whether to train a head for these (expected) labels; `always` without them is an error."""
    if mode not in MODES:
        raise TrainingError(f"fine_tune must be one of {', '.join(MODES)}, got {mode!r}")
    enough = len(usable_labels(labels, config)) >= 2
    if mode == "always" and not enough:
        raise TrainingError(
            "fine_tune=always needs at least two label folders with "
            f"{config.min_images_per_label} or more images each"
        )
    return mode != "never" and enough


@dataclass
class Outcome:
    head: Head | None  # the head to publish with, or None to publish frozen vectors
    evaluation: dict[str, Any] = field(default_factory=dict)


def not_trained(mode: str, config: HeadConfig) -> Outcome:
    """The outcome when no head is trained, saying why."""
    reason = (
        "fine_tune=never"
        if mode == "never"
        else (f"fewer than two label folders with {config.min_images_per_label} or more images")
    )
    return Outcome(None, {"kept": "frozen", "reason": reason})


def fine_tune(
    mode: str,
    backbone: np.ndarray,
    thumbs: np.ndarray,
    labels: list[str | None],
    config: HeadConfig,
    mirrored_backbone: np.ndarray | None = None,
    mirrored_thumbs: np.ndarray | None = None,
) -> Outcome:
    """Train a head on the labelled images, score it against the frozen backbone on a hold-out."""
    names = usable_labels(labels, config)
    if len(names) < 2:
        if mode == "always":
            plan(mode, labels, config)  # raises with the reason
        return not_trained(mode, config)
    split = _split(labels, names, config)
    db, train_labels = split.members[split.keep], split.label_ids[split.keep]
    mirrored = (
        []
        if mirrored_backbone is None or mirrored_thumbs is None
        else [(mirrored_backbone[db], mirrored_thumbs[db])]
    )
    data = TrainingData(backbone[db], thumbs[db], train_labels, mirrored)
    head, summary = train_head(data, names, config)
    frozen, tuned = _scores(head, backbone, thumbs, split)
    kept = mode == "always" or tuned[DECIDING_METRIC] > frozen[DECIDING_METRIC]
    evaluation = {
        "holdout_queries": int(len(split.held)),
        "database": int(len(db)),
        "labels": len(names),
        "frozen": frozen,
        "fine_tuned": tuned,
        "kept": "fine_tuned" if kept else "frozen",
        "decided_by": DECIDING_METRIC if mode == "auto" else "fine_tune=always",
        "training": summary,
    }
    return Outcome(head if kept else None, evaluation)


@dataclass(frozen=True)
class _Split:
    """The labelled rows (`members`), their label ids, and which of them are kept or held out."""

    members: np.ndarray
    label_ids: np.ndarray
    keep: np.ndarray
    held: np.ndarray


def _split(labels: list[str | None], names: list[str], config: HeadConfig) -> _Split:
    ids = {name: i for i, name in enumerate(names)}
    members = np.array([i for i, label in enumerate(labels) if label in ids])
    label_ids = np.array([ids[labels[i]] for i in members])
    keep, held = stratified_split(label_ids, config.holdout_fraction, config.seed)
    return _Split(members, label_ids, keep, held)


def _scores(
    head: Head, backbone: np.ndarray, thumbs: np.ndarray, split: _Split
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The hold-out's scores with the frozen backbone's vectors and with the head's."""
    db, queries = split.members[split.keep], split.members[split.held]
    db_labels, query_labels = split.label_ids[split.keep], split.label_ids[split.held]
    frozen = evaluate(exact_search(backbone[db]), db_labels, backbone[queries], query_labels)
    tuned_db = head.embed(backbone[db], thumbs[db])
    tuned = evaluate(
        exact_search(tuned_db), db_labels, head.embed(backbone[queries], thumbs[queries]), query_labels
    )
    return frozen, tuned
