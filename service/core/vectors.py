"""Vector helpers shared by encoders, heads and evaluation."""

from __future__ import annotations

import numpy as np


def normalise(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise rows; all-zero rows stay zero instead of turning into NaN."""
    vectors = np.asarray(vectors, dtype=np.float32)
    # einsum, not np.linalg.norm: the same sums without norm's Python-level checks (a query
    # normalises a few times; these microseconds add up per request).
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))[:, None]
    unit: np.ndarray = vectors / np.maximum(norms, 1e-12)
    return unit
