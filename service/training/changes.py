"""Item changes: add or replace items, delete items, edit an item's label and metadata.

Each change costs what it changes: an add writes one new segment (its rows only) and, for items it
replaces, new deletion bitmaps of the segments that held them; a delete writes deletion bitmaps; an
edit writes one overlay. Everything else is the base version's, referenced again, never copied.
`rebase.publish_with_rebase` publishes each like a train (manifest, compare-and-swap of CURRENT,
retention, rollback) and builds it again if another change won the race.
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from service.catalog import ingest
from service.catalog.head import Head
from service.catalog.rows import Catalog
from service.catalog.segment import editable, to_catalog
from service.catalog.view import Found
from service.core.config import Settings
from service.core.endpoint import EndpointSpec
from service.core.errors import ConflictError, InvalidParameterError, ItemNotFoundError, TrainingError
from service.core.names import check_label
from service.encoders import convert, litert
from service.storage import Storage, versions
from service.storage.blobs import BlobCache
from service.storage.manifest import BlobRef, Manifest, SegmentRef
from service.training import embedding, merge, screen, steps
from service.training.base import Base, read_base
from service.training.built import Built
from service.training.cache import VectorCache
from service.training.migration import Migration
from service.training.rebase import publish_with_rebase
from service.training.results import ChangeResult, Progress, ProgressFn, quiet
from service.training.sharded import Gathered
from service.training.stage import Stager

UNSET: Any = object()


def _label_delta(
    before: list[dict[str, Any]], after: list[dict[str, Any]], labels: dict[str, int]
) -> dict[str, int]:
    """Items per label once `before` entries (one per item) are gone and `after` ones are there."""
    counts = Counter(labels)
    counts.subtract(e["label"] for e in before if e.get("label") is not None)
    counts.update(e["label"] for e in after if e.get("label") is not None)
    return {label: n for label, n in sorted(counts.items()) if n > 0}


def _with_deleted(stager: Stager, segment_ref: SegmentRef, mask: np.ndarray) -> SegmentRef:
    """The segment with this version's deletion bitmap."""
    return replace(segment_ref, deleted=stager.deleted(mask), live=int(np.count_nonzero(~mask)))


# --- migrate ------------------------------------------------------------------------------------


def migrate(
    spec: EndpointSpec, storage: Storage, settings: Settings, cache: BlobCache | None = None
) -> ChangeResult:
    """Migrate the endpoint's current version if it is a format-1 one (else nothing happens)."""
    cache = cache or steps.blob_cache(storage, settings)
    base = read_base(storage, spec.name, cache, spec.search_k)
    if base is None or base.manifest.format != 1:
        version = base.version if base else ""
        return ChangeResult(version, "migrate", [], base.manifest.count if base else 0, {"migrated": False})
    return publish_with_rebase(storage, spec, settings, Migration(spec, storage), cache)


# --- add or replace ------------------------------------------------------------------------------


def add_items(
    spec: EndpointSpec,
    zip_path: Path | None,
    storage: Storage,
    settings: Settings,
    on_progress: ProgressFn | None = None,
    fine_tune: str = "auto",
    tensorflow: bool = True,
    gathered: Gathered | None = None,
    on_duplicate: str = "allow",
) -> ChangeResult:
    """Add the zip's images to the catalog; an item whose name exists already is replaced.
    `on_duplicate`: flag (list) or skip (leave out) images that copy an item of the catalogue or an
    earlier image of the zip (training/screen.py).
    `tensorflow=False`: raise NeedsTensorFlow rather than load it (a web worker's own thread).
    `gathered`: a sharded add's embedded images (the worker tier embedded them; `zip_path` unused).

    Only images whose bytes no retained version holds go through the encoder. With a kept head, new
    images go through the version's own head; `fine_tune=always` trains the head again on every
    item's stored backbone vectors (no forward pass for the old ones) and rewrites the catalog.
    """
    report = on_progress or quiet
    report(Progress("ingest", 0, 0))
    cache = steps.blob_cache(storage, settings)
    first = read_base(storage, spec.name, cache, spec.search_k)
    if not tensorflow and (first is None or not _converted(first.manifest, settings, fine_tune)):
        raise NeedsTensorFlow(
            f"{spec.name}: this add needs TensorFlow (the version changed since it was queued)"
        )
    encoder = (
        gathered.encoder if gathered else _encoder(spec, storage, settings, cache, first, fine_tune, report)
    )
    if first is not None:
        _check_encoder(first, encoder.fingerprint, spec)
    with (
        steps.work_folder(settings, spec.name, "add") as tmp,
        contextlib.nullcontext() if gathered else ingest.open_zip(Path(str(zip_path))) as zf,
    ):
        add = AddItems(
            spec,
            storage,
            settings,
            cache,
            encoder,
            gathered.plan if gathered else steps.plan_zip(zf, settings),  # type: ignore[arg-type]
            Path(tmp),
            fine_tune,
            report,
            on_duplicate=on_duplicate,
        )
        if gathered is not None:
            add.embedded = gathered.embedded
            add.check_accepted()
        else:
            assert zf is not None
            add.embed(zf, first)
        report(Progress("publish", 0, 1))
        try:
            result = publish_with_rebase(storage, spec, settings, add, cache)
        except Unchanged as same:  # on_duplicate=skip left out every image: nothing to publish
            counts = {"items": [], "images": 0, "skipped": len(add.skipped), "duplicates": add.duplicates}
            return ChangeResult(same.base.version, "add", [], same.base.manifest.count, counts, add.skipped)
        report(Progress("publish", 1, 1))
    return result


class NeedsTensorFlow(Exception):
    """An add that would load TensorFlow where it must not: run it where it may (a job's child)."""


def needs_tensorflow(spec: EndpointSpec, storage: Storage, settings: Settings, fine_tune: str) -> bool:
    """Whether an add must load TensorFlow: not when the current version's converted encoder can
    embed the new images by itself (and no head is trained again)."""
    pointer = versions.read_current(storage, spec.name)
    if pointer.version is None:
        return True
    return not _converted(versions.read_manifest(storage, spec.name, pointer.version), settings, fine_tune)


def _converted(manifest: Manifest, settings: Settings, fine_tune: str) -> bool:
    return (
        fine_tune != "always"
        and settings.encoder_runtime == "litert"
        and manifest.runtime.get("name") == litert.RUNTIME
        and manifest.encoder_model is not None
    )


def _encoder(
    spec: EndpointSpec, storage: Storage, settings: Settings, cache: BlobCache, first: Base | None,
    fine_tune: str, report: ProgressFn,
) -> convert.Verified | litert.LiteEncoder:  # fmt: skip
    """The current version's own converted encoder when it has one: checked when it was built, it
    embeds the new images consistently with the old, and no TensorFlow loads (a small add is served
    in about a second). Otherwise the endpoint's encoder through TensorFlow, converted and checked."""
    if first is not None and _converted(first.manifest, settings, fine_tune):
        model = first.manifest.encoder_model
        assert model is not None
        path = cache.path(spec.name, model, litert.MODEL_FILE)
        return litert.load(path, model.sha256, dict(first.manifest.encoder))
    return steps.converted_encoder(steps.load_encoder(spec, settings, storage), settings, report)


@dataclass
class AddItems:
    """An add: embed once (`embed`), then build on whichever version is current (`build`)."""

    spec: EndpointSpec
    storage: Storage
    settings: Settings
    cache: BlobCache
    encoder: convert.Verified | litert.LiteEncoder
    plan: ingest.ZipPlan
    embed_dir: Path  # the new images' originals
    fine_tune: str
    report: ProgressFn
    embedded: embedding.Embedded = field(default_factory=embedding.Embedded)
    on_duplicate: str = "allow"
    duplicates: dict[str, Any] | None = None  # what screening found (on the last base built on)
    dropped: int = 0  # images screening left out (on_duplicate=skip)

    @property
    def retrain(self) -> bool:
        return self.fine_tune == "always"  # else the base's head (if any) is kept as it is

    @property
    def thumb_dim(self) -> int:
        return 3 * self.spec.head.thumbnail**2

    def embed(self, zf: zipfile.ZipFile, first: Base | None) -> None:
        """Embed the new images (those no retained version holds) once, whatever the rebases."""
        # Mirrored vectors for the new images too when the catalog keeps them (head augmentation).
        keeps_mirrored = first is not None and all("mirrored" in s.files for s in first.manifest.segments)
        head_config = self.spec.head if self.retrain or keeps_mirrored else None
        cache = VectorCache.of_versions(
            self.storage, self.spec.name, self.cache, self.encoder.fingerprint, self.thumb_dim
        )
        self.embedded = embedding.embed(
            zf,
            self.plan,
            self.embed_dir,
            self.encoder,
            self.settings,
            head_config,
            self.spec.head.thumbnail,
            self.report,
            cache,
        )
        self.check_accepted()

    def check_accepted(self) -> None:
        if not self.embedded.accepted:
            raise TrainingError(
                f"the zip holds no usable image ({len(self.skipped)} files skipped)", self.skipped
            )

    @property
    def skipped(self) -> list[ingest.Skipped]:
        return [*self.plan.skipped, *self.embedded.skipped]

    def build(self, base: Base | None, stager: Stager, version: str) -> Built:
        if base is not None:
            _check_encoder(base, self.encoder.fingerprint, self.spec)
        floor = base.manifest.next_id if base else 0
        id_of = _id_of(base)
        new = merge.to_rows(
            self.embedded,
            self.plan,
            id_of,
            floor,
            self.thumb_dim,
            merge.reserver(self.storage, self.spec.name),
        )
        new = self._screen(base, new)
        replaced = {} if base is None else _replaced(base, new)
        if not self.embedded.stored:  # a sharded add's workers stored the originals already
            kept = {e["sha256"] for e in new.entries}  # screening may have left some out
            for accepted in self.embedded.accepted:
                if accepted.sha256 in kept:
                    stager.image(self.embed_dir / accepted.image, accepted.sha256)
        if self.retrain:
            segments, head, evaluation = self._rebuild(base, new, replaced, stager)
        else:
            segments, head, evaluation = (
                self._append(base, new, replaced, stager),
                (base.head if base else None),
                {},
            )
        runtime, model = self._stage_encoder(base, stager)
        manifest = self._manifest(
            base, segments, new, replaced, head, stager, runtime, model, evaluation, version
        )
        known = (
            (base.known() | {a.sha256 for a in self.embedded.accepted if base.view.find_image(a.sha256)})
            if base
            else set()
        )
        return Built(manifest, known, self._result(base, new, replaced, manifest, evaluation))

    def _screen(self, base: Base | None, new: Catalog) -> Catalog:
        """on_duplicate=flag|skip: the new images that copy an item of `base` (not the one they
        replace) or an earlier image of the zip, listed; with skip, left out (all of them: the
        version is not published, see Unchanged)."""
        self.dropped = 0
        if self.on_duplicate == "allow":
            return new
        head = base is not None and base.head is not None
        served = base.head.embed(new.backbone, new.thumbs) if base is not None and base.head else new.backbone
        threshold = self.spec.duplicate_threshold
        found = screen.screen(new, served, base.view if base else None, head, threshold)
        self.duplicates = screen.describe(new, found, self.on_duplicate, threshold)
        if self.on_duplicate != "skip" or not found:
            return new
        dropped = {d.row for d in found}
        self.dropped = len(dropped)
        kept = new.take(np.array([r for r in range(new.count) if r not in dropped], dtype=np.int64))
        if not kept.count:
            raise Unchanged(base) if base is not None else TrainingError("every image was skipped")
        return kept

    def _originals(self) -> list[Path]:
        return [self.embed_dir / a.image for a in self.embedded.accepted]

    def _stage_encoder(self, base: Base | None, stager: Stager) -> tuple[dict[str, Any], BlobRef | None]:
        """The runtime entry and the converted model of the new version: the base's, when its own
        converted encoder embedded the images; else the one this add converted and checked."""
        if isinstance(self.encoder, convert.Verified):
            return steps.stage_converted(self.encoder, stager, self.settings, self._originals())
        assert base is not None
        return dict(base.manifest.runtime), base.manifest.encoder_model

    def _describe_encoder(self, base: Base | None) -> dict[str, Any]:
        if isinstance(self.encoder, convert.Verified) or base is None:
            return {**self.encoder.describe(), "handle": self.spec.encoder.source}
        return dict(base.manifest.encoder)

    def _append(
        self, base: Base | None, new: Catalog, replaced: dict[int, Found], stager: Stager
    ) -> list[SegmentRef]:
        """The base's segments (those that held replaced items with new deletion bitmaps), then one
        new segment of the new rows, through the base's head when it has one."""
        if base is not None and base.head is not None:
            new.vectors = base.head.embed(new.backbone, new.thumbs)
        self.report(Progress("index", 0, new.count))
        segments = list(base.manifest.segments) if base else []
        if base is not None:
            for index, rows in _by_segment(replaced).items():
                mask = base.view.segments[index].deleted.copy()
                mask[rows] = True
                segments[index] = _with_deleted(stager, segments[index], mask)
        segments.append(
            stager.segment(new, self.spec.n_trees, head=base is not None and base.head is not None)
        )
        return segments

    def _rebuild(
        self, base: Base | None, new: Catalog, replaced: dict[int, Found], stager: Stager
    ) -> tuple[list[SegmentRef], Head | None, dict[str, Any]]:
        """fine_tune=always: the head trained again on every row's stored backbone vectors; every
        vector changes, so the catalog is written again as one segment."""
        kept = _live_catalog(base, exclude=set(replaced), next_id=new.next_id) if base else None
        if kept is not None:
            kept.vectors = kept.backbone  # every vector is made again, by the new head
        merged = kept.extend(new) if kept is not None else new
        merged.next_id = new.next_id
        outcome = steps.fine_tune("always", merged, self.spec.head, self.report)
        merged.vectors = (
            outcome.head.embed(merged.backbone, merged.thumbs) if outcome.head else merged.backbone
        )
        self.report(Progress("index", 0, merged.count))
        return (
            [stager.segment(merged, self.spec.n_trees, head=outcome.head is not None)],
            outcome.head,
            outcome.evaluation,
        )

    def _manifest(
        self,
        base: Base | None,
        segments: list[SegmentRef],
        new: Catalog,
        replaced: dict[int, Found],
        head: Head | None,
        stager: Stager,
        runtime: dict[str, Any],
        model: Any,
        evaluation: dict[str, Any],
        version: str,
    ) -> Manifest:
        items = sorted({int(i) for i in new.items})
        before = [_first_entry(base, found) for found in replaced.values()] if base else []
        after = [new.entries[int(r)] for r in np.unique(new.items, return_index=True)[1]]
        # A kept head keeps its files, its fused model among them (training/fuse.py); one trained
        # again here runs in NumPy until the next train fuses one (no TensorFlow backbone here).
        head_ref = None
        if base and head is base.head:
            head_ref = base.manifest.head
            if "head" in base.manifest.runtime:
                runtime = {**runtime, "head": base.manifest.runtime["head"]}
        elif head:
            head_ref = stager.head(head)
            runtime = {**runtime, "head": {"fused": False, "reason": "trained again by a change"}}
        fields: dict[str, Any] = {
            "encoder": self._describe_encoder(base),
            "runtime": runtime,
            "encoder_model": model,
            "dim": int(new.vectors.shape[1])
            if not self.retrain
            else int(head.dim if head else new.backbone.shape[1]),
            **steps.index_manifest(self.spec),
            "count": (base.manifest.count if base else 0) + len(items) - len(replaced),
            "rows": sum(s.rows for s in segments),
            "next_id": new.next_id,
            "labels": _label_delta(before, after, dict(base.manifest.labels) if base else {}),
            "segments": tuple(segments),
            "head": head_ref,
            "fine_tune": self.fine_tune if self.retrain or base is None else base.manifest.fine_tune,
            "evaluation": evaluation or (dict(base.manifest.evaluation) if base else {}),
            "change": {
                "kind": "add",
                "embedded": self.embedded.embedded,
                "reused": new.count + self.dropped - self.embedded.embedded,
                "items": items,
            },
        }
        if base is None:
            return Manifest(
                endpoint=self.spec.name, version=version, created_at="", lineage=version, base=None, **fields
            )
        return base.manifest.with_changes(**fields)

    def _result(
        self,
        base: Base | None,
        new: Catalog,
        replaced: dict[int, Found],
        manifest: Manifest,
        evaluation: dict[str, Any],
    ) -> ChangeResult:
        items = sorted({int(i) for i in new.items})
        counts = {
            "items": items,
            "images": new.count,
            "embedded": self.embedded.embedded,
            "reused": new.count + self.dropped - self.embedded.embedded,
            "skipped": len(self.skipped),
            "replaced": sorted(replaced),
            **({"duplicates": self.duplicates} if self.duplicates is not None else {}),
        }
        return ChangeResult(
            "", "add", items, manifest.count, counts, self.skipped, evaluation, runtime=dict(manifest.runtime)
        )


def _id_of(base: Base | None) -> merge.IdOf:
    def id_of(name: str) -> int | None:
        found = base.view.named_rows(name) if base is not None else None
        return None if found is None else int(base.view.segments[found.segment].items[found.rows[0]])  # type: ignore[union-attr]

    return id_of


def _replaced(base: Base, new: Catalog) -> dict[int, Found]:
    """The base's live rows of every item the new rows name again (replaced whole, all photos)."""
    found: dict[int, Found] = {}
    for name in {new.item_name(r) for r in range(new.count)}:
        rows = base.view.named_rows(name)
        if rows is not None:
            found[int(base.view.segments[rows.segment].items[rows.rows[0]])] = rows
    return found


def _by_segment(found: dict[int, Found]) -> dict[int, np.ndarray]:
    grouped: dict[int, list[np.ndarray]] = {}
    for f in found.values():
        grouped.setdefault(f.segment, []).append(f.rows)
    return {index: np.concatenate(rows) for index, rows in grouped.items()}


def _first_entry(base: Base, found: Found) -> dict[str, Any]:
    return base.view.segments[found.segment].entry(int(found.rows[0]))


def _live_catalog(base: Base, exclude: set[int], next_id: int) -> Catalog | None:
    """Every live row of the base (but those of `exclude`d items) as one Catalog."""
    parts = []
    for found in base.view.live():
        segment = base.view.segments[found.segment]
        rows = found.rows[~np.isin(segment.items[found.rows], list(exclude))] if exclude else found.rows
        if len(rows):
            parts.append(to_catalog(segment, rows, base.head is not None, next_id))
    if not parts:
        return None
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.extend(part)
    return merged


def _check_encoder(base: Base, fingerprint: str, spec: EndpointSpec) -> None:
    if base.manifest.encoder.get("fingerprint") != fingerprint:
        raise ConflictError(
            f"{spec.name}'s encoder is not the one its current version was built with; "
            f"train the endpoint again (POST /{spec.name}/train) before changing items"
        )
    thumb_dim = 3 * spec.head.thumbnail**2
    if any(("thumbs" in s.files) != (thumb_dim > 0) for s in base.manifest.segments if s.rows):
        raise ConflictError(f"{spec.name}'s head thumbnail size changed; train the endpoint again")


# --- delete --------------------------------------------------------------------------------------


def delete_items(
    spec: EndpointSpec,
    storage: Storage,
    settings: Settings,
    ids: list[int],
    names: list[str],
    cache: BlobCache | None = None,
    served: Any = None,
) -> ChangeResult:
    """Delete items by id or name. Any unknown one is a 404 and nothing is published."""
    return publish_with_rebase(storage, spec, settings, DeleteItems(spec, ids, names), cache, served)


@dataclass
class DeleteItems:
    spec: EndpointSpec
    ids: list[int]
    names: list[str]

    def build(self, base: Base | None, stager: Stager, version: str) -> Built:
        if base is None:
            raise ItemNotFoundError(f"{self.spec.name} has no trained version: nothing to delete")
        doomed = resolve(base, self.ids, self.names, self.spec.name)
        if len(doomed) >= base.manifest.count:
            raise ConflictError(
                f"deleting {len(doomed)} item(s) would leave {self.spec.name} empty; train it again instead"
            )
        segments = list(base.manifest.segments)
        for index, rows in _by_segment(doomed).items():
            mask = base.view.segments[index].deleted.copy()
            mask[rows] = True
            segments[index] = _with_deleted(stager, segments[index], mask)
        before = [_first_entry(base, found) for found in doomed.values()]
        manifest = base.manifest.with_changes(
            segments=tuple(segments),
            count=base.manifest.count - len(doomed),
            labels=_label_delta(before, [], dict(base.manifest.labels)),
            change={"kind": "delete", "items": sorted(doomed)},
        )
        return Built(manifest, base.known(), ChangeResult("", "delete", sorted(doomed), manifest.count))


def resolve(base: Base, ids: list[int], names: list[str], endpoint: str) -> dict[int, Found]:
    """The live rows of the items named by id or by name; any unknown one is a 404 (nothing is
    changed)."""
    found: dict[int, Found] = {}
    unknown = []
    for item_id in ids:
        rows = base.view.item_rows(item_id)
        if rows is None:
            unknown.append(str(item_id))
        else:
            found[item_id] = rows
    for name in names:
        rows = base.view.named_rows(name)
        if rows is None:
            unknown.append(name)
        else:
            found[int(base.view.segments[rows.segment].items[rows.rows[0]])] = rows
    if unknown:
        raise ItemNotFoundError(f"no item {', '.join(unknown[:10])} in {endpoint}; nothing was changed")
    return found


# --- edit ----------------------------------------------------------------------------------------


def edit_item(
    spec: EndpointSpec,
    storage: Storage,
    settings: Settings,
    item_id: int,
    label: Any = UNSET,
    metadata: Any = UNSET,
    cache: BlobCache | None = None,
    served: Any = None,
) -> ChangeResult:
    """Change an item's label and/or metadata: a JSON merge patch (RFC 7396) of the item's
    {"label", "metadata"} (null removes: the label, the whole metadata, or a field at any depth).
    Only this version's overlay of the item's segment changes; a patch that changes nothing
    publishes nothing (the result names the current version)."""
    if label is not UNSET and label is not None and not isinstance(label, str):
        raise InvalidParameterError("label must be a string or null", errors={"label": ["Not a string."]})
    if isinstance(label, str):
        check_label(label)
    if metadata is not UNSET and metadata is not None:
        if not isinstance(metadata, dict):
            raise InvalidParameterError(
                "metadata must be an object or null", errors={"metadata": ["Not an object."]}
            )
        ingest.check_metadata(metadata)
    try:
        return publish_with_rebase(
            storage, spec, settings, EditItem(spec, item_id, label, metadata), cache, served
        )
    except Unchanged as same:
        count = same.base.manifest.count
        return ChangeResult(same.base.version, "edit", [item_id], count)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396's MergePatch: an object patch merges member by member (null removes one), anything
    else replaces the target."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


class Unchanged(Exception):
    """An edit that would change nothing: no version is published."""

    def __init__(self, base: Base) -> None:
        super().__init__("unchanged")
        self.base = base


@dataclass
class EditItem:
    spec: EndpointSpec
    item_id: int
    label: Any  # UNSET: leave it; None: remove it; else the new label
    metadata: Any  # UNSET: leave it; None: remove it all; else a merge patch of it

    def build(self, base: Base | None, stager: Stager, version: str) -> Built:
        if base is None:
            raise ItemNotFoundError(f"{self.spec.name} has no trained version")
        found = resolve(base, [self.item_id], [], self.spec.name)[self.item_id]
        segment = base.view.segments[found.segment]
        overlay = dict(segment.overlay)
        changed = False
        for row in found.rows:
            before = editable(segment.entry(int(row)))
            edited = self.edited(before)
            changed |= _json(edited) != _json(before)  # as JSON: true is not 1 (Python says it is)
            overlay[int(row)] = edited
        if not changed:
            raise Unchanged(base)
        segments = list(base.manifest.segments)
        segments[found.segment] = replace(segments[found.segment], overlay=stager.overlay(overlay))
        before, after = segment.entry(int(found.rows[0])), overlay[int(found.rows[0])]
        manifest = base.manifest.with_changes(
            segments=tuple(segments),
            labels=_label_delta([before], [after], dict(base.manifest.labels)),
            change={"kind": "edit", "items": [self.item_id]},
        )
        return Built(manifest, base.known(), ChangeResult("", "edit", [self.item_id], manifest.count))

    def edited(self, document: dict[str, Any]) -> dict[str, Any]:
        """A row's {"label", "metadata"} (`editable`) with the patch applied."""
        patch = {}
        if self.label is not UNSET:
            patch["label"] = self.label
        if self.metadata is not UNSET:
            patch["metadata"] = self.metadata
        merged = merge_patch(document, patch)
        # The result stays within the bounds a new item's metadata has.
        metadata = ingest.check_metadata(merged.get("metadata") or {})
        return {"label": merged.get("label"), "metadata": metadata}
