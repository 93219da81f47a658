"""What duplicates are judged on: each image's backbone vector, PCA-whitened on the catalogue's own
vectors (Jégou and Chum, "Negative evidences and co-occurrences in image retrieval", ECCV 2012).

Neither the served vectors nor the raw backbone separate a copy from another item of the same
kind well: a fine-tuned head is trained to pull a class together (near-duplicates score no higher
than hard negatives), and the backbone's strongest directions describe the kind of thing, which
every item of a class shares. Whitening divides each principal direction by its spread, so the
rarer, item-specific detail counts as much as the shared shape (`make bench` part `duplicates`:
on the planted set, recall at precision 0.95 rises from 0.62 raw to 0.89 whitened, 0.94 with the
mirror images' descriptors a report adds).

A whitening needs many images to learn from: fitted on fewer than MIN_FIT, the best threshold drifts
with their number (0.57 at 2,000 images, 0.72 at 50, 0.85 at 5 on the planted set). Below it the
descriptor is the unit backbone vector itself and its cosine c is put on the same scale as a
whitened one's, score = (c - RAW_FLOOR) / (1 - RAW_FLOOR), so one threshold means about the same
at every size.

A version's whitening is fitted on its largest segment (the compacted base: every process that
opens the version fits the same one) from at most SAMPLE of its rows, evenly spread, with their
mirrored images' vectors when the segment keeps them, and cached on that segment.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from service.catalog.segment import Segment
from service.catalog.view import View

# Principal directions kept (fewer when the backbone or the sample is smaller), the largest
# sample fitted on, and the regulariser added to each direction's variance (a share of the largest:
# without it the noisiest directions, divided by almost nothing, would dominate).
DIMS = 512
SAMPLE = 10_000
CHUNK = 2048  # rows centred at a time while fitting
EPSILON = 1e-3
MIN_FIT = 1_000
RAW_FLOOR = 0.8
_FITTING = threading.Lock()


@dataclass(frozen=True)
class Whitening:
    """x -> unit((x - mean) @ projection)."""

    mean: np.ndarray  # float32 [D]
    projection: np.ndarray  # float32 [D, d]
    raw: bool = False  # too few images to fit on: the unit backbone vector, its cosine rescaled

    def score(self, cosine: float) -> float:
        """A duplicate score in [0, 1] from the cosine of two descriptors."""
        if self.raw:
            cosine = (cosine - RAW_FLOOR) / (1.0 - RAW_FLOOR)
        return float(min(1.0, max(0.0, cosine)))

    def cosine(self, threshold: float) -> float:
        """The descriptors' cosine a score threshold stands for (what an index search compares)."""
        return RAW_FLOOR + (1.0 - RAW_FLOOR) * threshold if self.raw else threshold

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0] if self.raw else self.projection.shape[1])

    def apply(self, backbone: np.ndarray) -> np.ndarray:
        """Unit descriptors (float32 [n, d]) of backbone vectors (float32 [n, D])."""
        out = np.asarray(backbone, dtype=np.float32)
        if not self.raw:
            out = (out - self.mean) @ self.projection
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


def fit(backbone: np.ndarray, mirrored: np.ndarray | None = None) -> Whitening:
    """The whitening of these vectors (their mirrored images' too, when given: a copy's mirror
    image should move nothing the whitening weighs heavily). Memory: the vectors given, plus a
    chunk of them in float64 at a time and the D x D covariance."""
    if len(backbone) < MIN_FIT:
        return raw(backbone.shape[1])
    parts = [backbone] if mirrored is None or not len(mirrored) else [backbone, mirrored]
    count = sum(len(p) for p in parts)
    mean = sum(np.asarray(p, dtype=np.float64).sum(axis=0) for p in parts) / count
    dim = backbone.shape[1]
    covariance = np.zeros((dim, dim))
    for part in parts:
        for start in range(0, len(part), CHUNK):
            centred = np.asarray(part[start : start + CHUNK], dtype=np.float64) - mean
            covariance += centred.T @ centred
    covariance /= count
    values, vectors = np.linalg.eigh(covariance)  # ascending
    keep = min(DIMS, dim, count - 1)
    values, vectors = values[::-1][:keep], vectors[:, ::-1][:, :keep]
    values = np.maximum(values, 0.0) + EPSILON * max(float(values[0]), 1e-12)
    projection = vectors / np.sqrt(values)
    return Whitening(mean.astype(np.float32), projection.astype(np.float32))


def raw(dim: int) -> Whitening:
    """No whitening: the unit backbone vectors (a catalogue smaller than MIN_FIT)."""
    return Whitening(np.zeros(dim, np.float32), np.zeros((dim, 0), np.float32), raw=True)


def sample_rows(rows: int) -> np.ndarray:
    """The rows a whitening is fitted on: evenly spread, the same in every process."""
    return np.unique(np.linspace(0, rows - 1, min(rows, SAMPLE)).round().astype(np.int64))


def backbone_of(segment: Segment, head: bool, rows: np.ndarray) -> np.ndarray:
    """float32 backbone vectors of a segment's rows (`head`: its version has a head)."""
    return segment.training_inputs(head, rows)[0]


def of_view(view: View, head: bool) -> Whitening:
    """The version's whitening (see the module's docstring), cached on its largest segment."""
    largest = max(view.segments, key=lambda s: s.rows, default=None)
    if largest is None or largest.rows == 0:
        return raw(view.manifest.dim)
    cached = largest.__dict__.get("_whitening")
    if cached is None:
        with _FITTING:  # the first queries after a new base: one fit, the others wait for it
            cached = largest.__dict__.get("_whitening")
            if cached is None:
                rows = sample_rows(largest.rows)
                backbone, _, mirrored = largest.training_inputs(head, rows)
                cached = largest.__dict__["_whitening"] = fit(backbone, mirrored)
    return cached
