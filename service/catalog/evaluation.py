"""Retrieval metrics with labels: precision@1, precision@10 and mAP@10 (relevant = same label).

AP@k of one query = sum over ranks i <= k of precision@i at each relevant rank, divided by
min(k, number of relevant items in the database); mAP@k is its mean over the queries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from service.core.vectors import normalise

# (query vectors, k) -> indices of the k nearest database items per query, best first (-1: none)
Searcher = Callable[[np.ndarray, int], np.ndarray]


def exact_search(database: np.ndarray, chunk: int = 1024) -> Searcher:
    """Brute-force cosine search (the reference the Annoy index is measured against)."""
    db = normalise(database)

    def search(queries: np.ndarray, k: int) -> np.ndarray:
        k = min(k, len(db))
        out = []
        for start in range(0, len(queries), chunk):
            scores = normalise(queries[start : start + chunk]) @ db.T
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
            out.append(np.take_along_axis(top, order, axis=1))
        return np.concatenate(out)

    return search


def ranking_metrics(
    ranked_labels: np.ndarray, query_labels: np.ndarray, relevant_counts: np.ndarray, k: int = 10
) -> dict[str, float]:
    """Metrics from the labels of each query's top-k results ([n_queries, k])."""
    relevant = (ranked_labels[:, :k] == query_labels[:, None]).astype(np.float64)
    precision_at = np.cumsum(relevant, axis=1) / np.arange(1, relevant.shape[1] + 1)
    ap = (precision_at * relevant).sum(axis=1) / np.maximum(np.minimum(k, relevant_counts), 1)
    return {
        "precision@1": round(float(relevant[:, 0].mean()), 4),
        f"precision@{k}": round(float(relevant.mean()), 4),
        f"map@{k}": round(float(ap.mean()), 4),
        "queries": int(len(query_labels)),
    }


def evaluate(
    search: Searcher, database_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray, k: int = 10
) -> dict[str, Any]:
    """Precision@1, precision@k and mAP@k of `queries` against a database with integer labels
    (>= 0); a search that finds fewer than k items counts the missing ranks as misses."""
    found = search(queries, k)
    ranked = np.full((len(queries), k), -1, dtype=np.int64)
    ranked[:, : found.shape[1]] = np.where(found >= 0, database_labels[np.maximum(found, 0)], -1)
    counts = np.array([(database_labels == label).sum() for label in query_labels])
    return ranking_metrics(ranked, query_labels, counts, k)
