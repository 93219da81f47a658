"""Alpha-query expansion (serving/query.py `expand`, `ranked`): the query plus its best matches,
weighted by score ** alpha, searched again."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.catalog.view import View
from service.core.endpoint import QueryConfig
from service.serving.query import expand, ranked
from service.serving.search import search
from tests.helpers import headless_rows, staged_view


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def view_of(tmp_path: Path, vectors: np.ndarray) -> View:
    return staged_view(tmp_path, (headless_rows(vectors), 2000))


def test_expansion_brings_up_what_the_best_match_is_like(tmp_path: Path) -> None:
    q = unit(np.array([1.0, 0.0, 0.0, 0.0]))
    a = unit(np.array([0.95, 0.3, 0.0, 0.0]))  # the best match
    b = unit(np.array([0.6, 0.8, 0.0, 0.0]))  # like a, less like the query
    c = unit(np.array([0.7, 0.0, 0.71, 0.0]))  # like the query only
    far = unit(np.array([0.0, 0.0, 0.0, 1.0]))
    view = view_of(tmp_path, np.stack([a, b, c, far]))
    plain = [h.row for h in ranked(view, q, 3, QueryConfig(False, 0))]
    assert plain == [0, 2, 1]
    expanded = [h.row for h in ranked(view, q, 3, QueryConfig(False, 1, 1.0))]
    assert expanded == [0, 1, 2]

    hits = search(view, q, 2)
    want = unit(q + hits[0].score ** 3 * a + hits[1].score ** 3 * c)
    assert np.allclose(expand(view, q, hits, QueryConfig(False, 2, 3.0)), want, atol=1e-5)
    assert np.allclose(expand(view, q, [], QueryConfig(False, 2, 3.0)), q)  # nothing to expand with


def test_off_it_answers_as_today_and_on_it_expands_through_an_annoy_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vectors = unit(rng.standard_normal((2500, 16)))  # over INDEX_MIN_ROWS: an Annoy index
    view = view_of(tmp_path, vectors)
    assert view.segments[0].index is not None
    keep = np.zeros(2500, dtype=bool)
    keep[::2] = True
    mask = lambda index, segment: keep  # noqa: E731
    for q in unit(rng.standard_normal((5, 16))):
        assert ranked(view, q, 7, QueryConfig(), mask, exclude=4) == search(view, q, 7, mask, exclude=4)
        hits = search(view, q, 3, mask)
        want = unit(q + sum(h.score**3 * vectors[h.row] for h in hits))
        assert np.allclose(expand(view, q, hits, QueryConfig(False, 3, 3.0)), want, atol=1e-5)
        treated = ranked(view, q, 7, QueryConfig(False, 3, 3.0), mask, exclude=4)
        assert len(treated) == 7 and all(keep[h.row] and h.row != 4 for h in treated)
