"""Duplicate groups (catalog/duplicates.py) and the descriptors they are judged on (descriptor.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.catalog import descriptor
from service.catalog.duplicates import DescriptorIndex, Grouper, Ignored


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def digests(*bytes_of: int) -> np.ndarray:
    return np.array([[b] * 32 for b in bytes_of], dtype=np.uint8)


def test_equal_bytes_join_and_the_oldest_item_comes_first() -> None:
    grouper = Grouper(np.array([10, 11, 3, 12, -1, 13]))
    grouper.join_equal(digests(1, 2, 1, 3, 2, 1))  # rows 0, 2, 5 share bytes; row 4 is deleted
    assert grouper.groups() == [[2, 0, 5]]  # item 3 is the oldest


def test_a_chain_of_duplicates_is_one_group_and_an_items_own_photos_never_join() -> None:
    grouper = Grouper(np.array([1, 2, 3, 3, 4]))
    assert grouper.join(0, 1) and grouper.join(1, 2)
    assert not grouper.join(2, 3)  # two photos of item 3
    assert grouper.groups() == [[0, 1, 2]]


def test_marked_not_duplicates_never_join_directly() -> None:
    grouper = Grouper(np.array([1, 2, 3]), Ignored([[1, 2]]))
    assert not grouper.join(0, 1)
    assert grouper.groups() == []
    assert grouper.join(0, 2) and grouper.join(1, 2)  # a third item joining both: a new group
    assert grouper.groups() == [[0, 1, 2]]


def test_the_descriptor_index_finds_each_rows_nearest_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = unit(rng.standard_normal((300, 24)))
    vectors[7] = unit(vectors[3] + 0.02 * rng.standard_normal(24))
    index = DescriptorIndex(24, tmp_path / "d.ann")
    index.add(vectors[:100])
    index.add(vectors[100:])
    index.build()
    (first, cosine), *_ = index.neighbours(3)
    assert first == 7 and cosine == np.float32(cosine) and cosine > 0.99
    assert np.allclose(index.vector(7), vectors[7], atol=1e-6)
    index.close()
    assert not (tmp_path / "d.ann").exists()


def test_whitening_separates_a_copy_from_another_item_of_its_kind() -> None:
    # Items share a strong "kind" direction and differ in weak ones; a copy is its item plus noise.
    rng = np.random.default_rng(1)
    kind = unit(rng.standard_normal((1, 64)))[0]
    items = unit(5 * kind + 0.5 * rng.standard_normal((2000, 64)))
    copy = unit(items[0] + 0.05 * rng.standard_normal(64))
    other = items[1]
    whitening = descriptor.fit(items)
    assert not whitening.raw and whitening.dim == 64
    a, b, c = whitening.apply(np.stack([items[0], copy, other]))
    raw_gap = float(items[0] @ copy - items[0] @ other)
    assert float(a @ b - a @ c) > raw_gap * 2  # the shared kind no longer hides the difference


def test_too_few_images_to_fit_on_use_the_raw_vectors_on_the_same_scale() -> None:
    whitening = descriptor.fit(unit(np.random.default_rng(2).standard_normal((10, 8))))
    assert whitening.raw and whitening.dim == 8
    assert whitening.score(1.0) == 1.0 and whitening.score(descriptor.RAW_FLOOR) == 0.0
    assert whitening.cosine(0.5) == descriptor.RAW_FLOOR + (1 - descriptor.RAW_FLOOR) * 0.5
    assert whitening.score(whitening.cosine(0.5)) == 0.5


def test_copies_name_every_photo_of_an_item_that_copies_an_older_one() -> None:
    grouper = Grouper(np.array([1, 2, 2, 3]))  # item 2 has two photos, both copies of item 1
    assert grouper.join(0, 1) and grouper.join(0, 2)
    assert grouper.groups() == [[0, 1]]  # a report lists each item once
    assert sorted(grouper.copies()) == [(1, 0), (2, 0)]  # a screening leaves out both photos
