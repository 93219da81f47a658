"""Compaction: merging small segments, and rewriting segments with many deleted rows, into one new
segment (with an Annoy index once it is large enough), off the request path, as a job.

The policy is tiered, after Lucene's TieredMergePolicy: segments are grouped by size (a tier per
power of ten rows); a tier that holds more than `max_per_tier` segments is merged whole, and so is
any segment whose deleted share passes `max_deleted_share` or whose overlay of edits has grown past
`max_overlay_bytes`. The largest segment (a train's) is left alone until its own deletions call
for it. A compaction is published like any change: if a change lands while it runs, its deletions
and edits are carried onto the merged segment (rows are remapped, nothing is embedded or indexed
again); if a segment it merged is gone (a train, another compaction), it gives up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from service.catalog.rows import Catalog
from service.catalog.segment import Segment, editable, to_catalog
from service.core.config import Settings
from service.core.endpoint import EndpointSpec
from service.core.errors import ConflictError
from service.storage import Storage, gc
from service.storage.manifest import BlobRef, Manifest, SegmentRef
from service.training import steps
from service.training.base import Base, read_base
from service.training.built import Built
from service.training.rebase import publish_with_rebase
from service.training.results import ChangeResult, Progress, ProgressFn, quiet
from service.training.stage import Stager


@dataclass(frozen=True)
class Policy:
    max_per_tier: int = 8
    max_deleted_share: float = 0.2
    max_overlay_bytes: int = 512 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            settings.compact_max_segments, settings.compact_deleted_share, settings.compact_overlay_kb * 1024
        )


def plan(manifest: Manifest, policy: Policy) -> list[int]:
    """The segments (their indexes in the manifest) a compaction should merge; [] when none."""
    segments = manifest.segments
    chosen = {
        i
        for i, s in enumerate(segments)
        if (s.rows and (s.rows - s.live) / s.rows > policy.max_deleted_share)
        or (s.overlay is not None and s.overlay.size > policy.max_overlay_bytes)
        or s.images is not None  # a format-1 segment: migrated, never merged as it is
    }
    tiers: dict[int, list[int]] = {}
    for i, s in enumerate(segments):
        tiers.setdefault(int(math.log10(max(s.rows, 1))), []).append(i)
    for members in tiers.values():
        if len(members) > policy.max_per_tier:
            chosen.update(members)
    chosen = {i for i in chosen if segments[i].images is None}
    if len(chosen) == 1:
        lone = segments[next(iter(chosen))]
        overlay_big = lone.overlay is not None and lone.overlay.size > policy.max_overlay_bytes
        if lone.live == lone.rows and not overlay_big:
            return []  # a lone segment with nothing to drop or fold in: merging it changes nothing
    return sorted(chosen)


def due(manifest: Manifest, policy: Policy) -> bool:
    return bool(plan(manifest, policy))


def compact(
    spec: EndpointSpec,
    storage: Storage,
    settings: Settings,
    on_progress: ProgressFn | None = None,
    every_segment: bool = False,
) -> ChangeResult:
    """Merge what the policy picks (every segment with `every_segment`) into one segment; publish."""
    report = on_progress or quiet
    cache = steps.blob_cache(storage, settings)
    base = read_base(storage, spec.name, cache, spec.search_k)
    if base is None:
        raise ConflictError(f"{spec.name} has no trained version to compact")
    chosen = (
        list(range(len(base.manifest.segments)))
        if every_segment
        else plan(base.manifest, Policy.from_settings(settings))
    )
    if not chosen:
        return ChangeResult(base.version, "compact", [], base.manifest.count, {"segments_merged": 0})
    with steps.work_folder(settings, spec.name, "compact") as tmp:
        merge = Merge(spec, [base.manifest.segments[i].id for i in chosen], report)
        merge.prepare(base, Path(tmp))
        try:
            result = publish_with_rebase(storage, spec, settings, merge, cache)
        except SegmentsGone as gone:  # another compaction or a train got there first: nothing to do
            current = read_base(storage, spec.name, cache, spec.search_k)
            count = current.manifest.count if current else 0
            return ChangeResult(
                current.version if current else "",
                "compact",
                [],
                count,
                {"segments_merged": 0, "skipped": gone.message},
            )
    try:
        gc.sweep(storage, spec.name)  # the merged segments' rows are gone: their images may be too
    except Exception:  # best effort: the next sweep catches them
        pass
    return result


class SegmentsGone(ConflictError):
    """A segment a compaction merged is in no current version any more."""


@dataclass
class Merge:
    """A compaction: the merged segment is built once (`prepare`); each `build` places it in
    whichever version is current, carrying that version's deletions and edits onto it."""

    spec: EndpointSpec
    segment_ids: list[str]
    report: ProgressFn
    merged: SegmentRef | None = None
    files: list[tuple[Path, BlobRef]] = field(default_factory=list)
    # Per merged segment: its rows that were live (in the merged segment's order, from `start`), and
    # the edits baked into the merged rows' entries.
    origin: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)
    baked: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)

    def prepare(self, base: Base, folder: Path) -> None:
        """Read the live rows of the chosen segments, write them as one segment."""
        parts: list[Catalog] = []
        start = 0
        for segment in base.view.segments:
            if segment.ref.id not in self.segment_ids:
                continue
            live = segment.live()
            self.origin[segment.ref.id] = (live, start)
            self.baked[segment.ref.id] = dict(segment.overlay)
            start += len(live)
            if len(live):
                parts.append(to_catalog(segment, live, base.head is not None, base.manifest.next_id))
        if not parts:
            raise ConflictError(f"{self.spec.name}: the segments to compact hold no live row")
        rows = parts[0]
        for part in parts[1:]:
            rows = rows.extend(part)
        self.report(Progress("index", 0, rows.count))
        stager = Stager(folder)
        self.merged = stager.segment(rows, self.spec.n_trees, head=base.head is not None)
        self.files = stager.files
        self.report(Progress("index", rows.count, rows.count))

    def build(self, base: Base | None, stager: Stager, version: str) -> Built:
        assert self.merged is not None
        if base is None:
            raise ConflictError(f"{self.spec.name} has no version any more")
        present = {s.ref.id: s for s in base.view.segments}
        if not set(self.segment_ids) <= set(present):
            raise SegmentsGone(
                f"{self.spec.name} was rewritten while it was compacted (a train or another compaction)"
            )
        stager.files.extend(self.files)
        merged = self._carry(present, stager)
        kept = [s for s in base.manifest.segments if s.id not in self.segment_ids]
        segments = (*kept, merged)
        manifest = base.manifest.with_changes(
            segments=segments,
            rows=sum(s.rows for s in segments),
            change={"kind": "compact", "segments_merged": len(self.segment_ids), "rows": merged.rows},
        )
        counts = {"segments_merged": len(self.segment_ids), "rows": merged.rows, "segments": len(segments)}
        return Built(manifest, base.known(), ChangeResult("", "compact", [], manifest.count, counts))

    def _carry(self, present: dict[str, Segment], stager: Stager) -> SegmentRef:
        """The merged segment with the deletions and edits made to its rows since it was built
        (a rollback meanwhile too: an edit it undid is undone on the merged row as well)."""
        assert self.merged is not None
        deleted = np.zeros(self.merged.rows, dtype=bool)
        edits: dict[int, dict[str, Any]] = {}
        for segment_id in self.segment_ids:
            segment = present[segment_id]
            live, start = self.origin[segment_id]
            dead = segment.deleted
            if np.count_nonzero(~dead) > np.count_nonzero(~dead[live]):
                # Rows live now that were deleted when the merge read them: a rollback restored
                # them, and the merged segment lacks them. The next change compacts again.
                raise SegmentsGone(f"{self.spec.name} was rolled back while it was compacted")
            deleted[start : start + len(live)] = dead[live]
            baked, overlay = self.baked[segment_id], segment.overlay
            for row in set(baked) | set(overlay):
                position = int(np.searchsorted(live, row))
                if position == len(live) or live[position] != row or dead[row]:
                    continue  # a row the merge left out, or deleted since
                if overlay.get(row) != baked.get(row):  # edited (or an edit undone) since
                    edits[start + position] = editable(segment.entry(row))
        return replace(
            self.merged,
            deleted=stager.deleted(deleted),
            overlay=stager.overlay(edits) if edits else None,
            live=int(np.count_nonzero(~deleted)),
        )
