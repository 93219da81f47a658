"""Searching a version's segments: each segment's best k items (Annoy for an indexed segment, an exact
scan for a small one; deleted rows and filtered-out rows passed over), merged by score.

Every segment answers for its own rows only, and an item's rows all live in one segment, so the
merged top k is as good as each segment's own search: the small segments that changes add are
searched exactly and cost the recall nothing.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from service.catalog.index import Neighbour, best
from service.catalog.segment import Segment
from service.catalog.view import View
from service.serving import filters


class Hit(NamedTuple):
    """A row that matched: ordered by score (best first when sorted in reverse). A tuple, not a
    dataclass: merging the segments' hits compares them dozens of times per query, in C this way."""

    score: float
    segment: int
    row: int


# mask(segment index, segment) -> the rows that may match (None: every live row)
MaskFn = Callable[[int, Segment], np.ndarray]


def search(
    view: View, vector: np.ndarray, k: int, mask: MaskFn | None = None, exclude: int | None = None
) -> list[Hit]:
    """The k best items of the version for `vector`, best first, each as its best-matching row."""
    hits: list[Hit] = []
    for index, segment in enumerate(view.segments):
        if segment.index is None:
            continue  # the small segments are scanned together, below
        allowed = _allowed(segment, index, mask, exclude)
        for n in segment_search(segment, vector, k, allowed):
            hits.append(Hit(n.score, index, n.id))
    small = _small_block(view)
    if small is not None:
        hits.extend(_scan(small, view, vector, k, mask, exclude))
    return heapq.nlargest(k, hits)


@dataclass(frozen=True)
class _Block:
    """Every small (unindexed) segment of a version in one matrix: the changes since the last
    compaction, scanned with one product instead of one per segment."""

    vectors: np.ndarray  # float32 [rows, dim]
    segment: np.ndarray  # each row's segment (its index in the view)
    row: np.ndarray  # each row's row in its segment
    item: np.ndarray  # each row's item id
    dead: np.ndarray  # rows this version does not serve
    grouped: bool  # some item has several rows


def _small_block(view: View) -> _Block | None:
    cached = view.__dict__.get("_small", False)
    if cached is not False:
        return cached
    small = [(i, s) for i, s in enumerate(view.segments) if s.index is None and s.rows]
    block = None
    if small:
        items = np.concatenate([np.asarray(s.items) for _, s in small])
        block = _Block(
            vectors=np.concatenate([np.asarray(s.vectors, dtype=np.float32) for _, s in small]),
            segment=np.concatenate([np.full(s.rows, i, np.int64) for i, s in small]),
            row=np.concatenate([np.arange(s.rows, dtype=np.int64) for _, s in small]),
            item=items,
            dead=np.concatenate([s.deleted for _, s in small]),
            grouped=len(np.unique(items)) != len(items),
        )
    view.__dict__["_small"] = block
    return block


def _scan(
    block: _Block, view: View, vector: np.ndarray, k: int, mask: MaskFn | None, exclude: int | None
) -> list[Hit]:
    # One product over the whole block (contiguous), then only the allowed rows' scores: cheaper
    # than gathering the allowed rows' vectors first.
    scores = (block.vectors @ np.asarray(vector, dtype=np.float32)).astype(np.float64)
    allowed = None if not block.dead.any() else ~block.dead
    if exclude is not None:
        allowed = (block.item != exclude) if allowed is None else allowed & (block.item != exclude)
    if mask is not None:
        segments = sorted(set(block.segment.tolist()))
        kept = np.concatenate([mask(i, view.segments[i]) for i in segments])
        allowed = kept if allowed is None else allowed & kept
    rows = np.arange(len(scores)) if allowed is None else np.flatnonzero(allowed)
    if not len(rows):
        return []
    if block.grouped:
        found = best(rows, scores[rows], k, block.item)
        return [Hit(n.score, int(block.segment[n.id]), int(block.row[n.id])) for n in found]
    # One row per item: the k best by a partial sort, straight into hits.
    kept = scores[rows]
    top = np.argpartition(-kept, k - 1)[:k] if len(kept) > k else np.arange(len(kept))
    top = top[np.argsort(-kept[top], kind="stable")]
    picked = rows[top]
    return [
        Hit(float(score), int(segment), int(row))
        for score, segment, row in zip(kept[top], block.segment[picked], block.row[picked], strict=True)
    ]


def _allowed(segment: Segment, index: int, mask: MaskFn | None, exclude: int | None) -> np.ndarray | None:
    """The rows that may match in this segment; None when every row may (the fast path)."""
    rows_ok = None if mask is None else mask(index, segment)
    if rows_ok is None and exclude is None and not _any_dead(segment):
        return None
    dead = segment.deleted
    if exclude is not None:
        dead = dead | (np.asarray(segment.items) == exclude)
    return ~dead if rows_ok is None else rows_ok & ~dead


def _any_dead(segment: Segment) -> bool:
    cached = segment.__dict__.get("_any_dead")
    if cached is None:
        cached = segment.__dict__["_any_dead"] = bool(segment.deleted.any())
    return cached


def one_row_per_item(segment: Segment) -> bool:
    return _groups(segment) is None


def segment_search(
    segment: Segment, vector: np.ndarray, k: int, allowed: np.ndarray | None
) -> list[Neighbour]:
    """The best row of each of the segment's k best items among `allowed` rows (None: all)."""
    groups = _groups(segment)
    if segment.index is None:  # a small segment: an exact scan of its vectors
        rows = np.arange(segment.rows) if allowed is None else np.flatnonzero(allowed)
        if not len(rows):
            return []
        scores = np.asarray(segment.vectors[rows], dtype=np.float32) @ np.asarray(vector, dtype=np.float32)
        return best(rows, scores.astype(np.float64), k, groups)
    if allowed is None and groups is None:
        return segment.index.query(vector, k)
    mask = np.ones(segment.rows, dtype=bool) if allowed is None else allowed
    return segment.index.query_masked(vector, k, mask, groups)


def _groups(segment: Segment) -> np.ndarray | None:
    """Row -> item when the segment holds items with several rows (photos), else None."""
    cached = segment.__dict__.get("_groups", False)
    if cached is False:
        items = np.asarray(segment.items)
        cached = None if len(np.unique(items)) == segment.rows else items
        segment.__dict__["_groups"] = cached
    return cached


def filter_mask(flt: filters.Filter) -> MaskFn:
    """The rows of each segment a filter keeps, with this version's edits applied."""

    def mask(index: int, segment: Segment) -> np.ndarray:
        columns = segment.__dict__.setdefault("_columns", filters.ColumnCache())
        kept = filters.evaluate(flt, segment.entries, columns)
        for row in segment.overlay:  # rows this version edited: judged on their edited entry
            kept[row] = filters.matches(flt, segment.entry(row))
        return kept

    return mask


def row_vector(view: View, segment: int, row: int) -> np.ndarray:
    """One row's served vector (float32, unit), as its segment holds it."""
    held = view.segments[segment]
    if held.index is not None:
        return held.index.item_vectors(np.array([row]))[0]
    return np.asarray(held.vectors[row], dtype=np.float32)


def entry_of(view: View, hit: Hit) -> tuple[int, dict[str, Any], str]:
    """A hit's item id, entry (edits applied) and image name."""
    segment = view.segments[hit.segment]
    return int(segment.items[hit.row]), segment.entry(hit.row), segment.names[hit.row]
