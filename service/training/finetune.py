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
    ids = {name: i for i, name in enumerate(names)}
    members = np.array([i for i, label in enumerate(labels) if label in ids])
    label_ids = np.array([ids[labels[i]] for i in members])
    keep, held = stratified_split(label_ids, config.holdout_fraction, config.seed)
    db, queries = members[keep], members[held]

    def subset(array: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
        return None if array is None else array[rows]

    head, summary = train_head(
        TrainingData(
            backbone[db],
            thumbs[db],
            label_ids[keep],
            subset(mirrored_backbone, db),
            subset(mirrored_thumbs, db),
        ),
        names,
        config,
    )
    frozen = evaluate(exact_search(backbone[db]), label_ids[keep], backbone[queries], label_ids[held])
    tuned_db = head.embed(backbone[db], thumbs[db])
    tuned = evaluate(
        exact_search(tuned_db),
        label_ids[keep],
        head.embed(backbone[queries], thumbs[queries]),
        label_ids[held],
    )
    better = tuned[DECIDING_METRIC] > frozen[DECIDING_METRIC]
    kept = mode == "always" or better
    evaluation = {
        "holdout_queries": int(len(queries)),
        "database": int(len(db)),
        "labels": len(names),
        "frozen": frozen,
        "fine_tuned": tuned,
        "kept": "fine_tuned" if kept else "frozen",
        "decided_by": DECIDING_METRIC if mode == "auto" else "fine_tune=always",
        "training": summary,
    }
    return Outcome(head if kept else None, evaluation)
