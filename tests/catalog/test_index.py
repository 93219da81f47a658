"""Annoy indexes: exact answers on tiny hand-made vectors, cosine scores, the item excluded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.catalog.index import IndexReader, build_index, cosine_from_angular
from service.core.vectors import normalise

VECTORS = normalise(np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]], np.float32))


@pytest.fixture
def reader(tmp_path: Path) -> IndexReader:
    path = tmp_path / "index.ann"
    build_index(VECTORS, n_trees=4, path=path)
    return IndexReader(path, dim=3)


def test_nearest_items_come_best_first(reader: IndexReader) -> None:
    found = reader.query(normalise(np.array([[1, 0.05, 0]], np.float32))[0], 3)
    assert [n.id for n in found] == [0, 1, 2]
    assert found[0].score > found[1].score > found[2].score


def test_scores_are_cosine_similarities(reader: IndexReader) -> None:
    query = normalise(np.array([[1, 1, 0]], np.float32))[0]
    for n in reader.query(query, 4):
        assert n.score == pytest.approx(float(VECTORS[n.id] @ query), abs=1e-5)


def test_an_identical_vector_scores_one(reader: IndexReader) -> None:
    assert reader.query(VECTORS[2], 1)[0].score == pytest.approx(1.0, abs=1e-6)


def test_similar_to_item_excludes_the_item(reader: IndexReader) -> None:
    found = reader.similar_to_item(0, 2)
    assert [n.id for n in found] == [1, 2]


def test_asking_for_more_than_exist_returns_all(reader: IndexReader) -> None:
    assert len(reader.query(VECTORS[0], 50)) == 4
    assert reader.count == 4


def test_angular_distance_maps_to_cosine() -> None:
    assert cosine_from_angular(0.0) == 1.0
    assert cosine_from_angular(np.sqrt(2.0)) == pytest.approx(0.0)
    assert cosine_from_angular(2.0) == -1.0


def test_every_item_finds_itself_first(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = normalise(rng.normal(size=(500, 16)).astype(np.float32))
    build_index(vectors, 8, tmp_path / "a.ann")
    reader = IndexReader(tmp_path / "a.ann", 16)
    assert all(reader.query(vectors[i], 1)[0].id == i for i in range(500))


def test_search_k_grows_with_the_index() -> None:
    from service.catalog.index import auto_search_k

    assert auto_search_k(500) == 1000  # small indexes: a floor that makes search exhaustive
    assert auto_search_k(100_000) == 4009
    assert auto_search_k(1_000_000) == 8000


def test_an_explicit_search_k_is_kept(tmp_path: Path) -> None:
    build_index(VECTORS, 2, tmp_path / "i.ann")
    assert IndexReader(tmp_path / "i.ann", 3, search_k=-1).search_k == -1
    assert IndexReader(tmp_path / "i.ann", 3).search_k == 1000
