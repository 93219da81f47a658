"""Item changes: add or replace items, delete items, edit an item's label and metadata.

Each change is a small class whose `build` makes the new version's files from a base version, in
named steps; `rebase.publish_with_rebase` publishes it like a train (immutable folder, manifest,
compare-and-swap of CURRENT, retention, rollback) and builds it again if another change won the
race. Files a change does not alter (the index, vectors and images of a delete or an edit; the
images of the items an add keeps) are copied inside the store, never uploaded again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.catalog import ingest, rows
from service.catalog.head import HEAD_FILES, Head
from service.catalog.rows import DELETED, Catalog, VectorCache
from service.core.config import Settings
from service.core.endpoint import EndpointSpec
from service.core.errors import ConflictError, InvalidParameterError, ItemNotFoundError, TrainingError
from service.encoders import convert
from service.storage import Storage
from service.training import embedding, merge, steps
from service.training.rebase import Base, Built, Carried, publish_with_rebase, read_base, summary
from service.training.results import ChangeResult, Progress, ProgressFn, quiet

# Deleted rows stay in the index as tombstones until they are this share of it; then a delete
# rebuilds the index without them.
MAX_TOMBSTONE_SHARE = 0.2
# What a change that keeps the base's index keeps with it.
INDEX_FILES = ("index.ann", "vectors.npy", "backbone.npy", "thumbs.npy", "mirrored.npy")
UNSET: Any = object()


# --- add or replace ------------------------------------------------------------------------------


def add_items(
    spec: EndpointSpec,
    zip_path: Path,
    storage: Storage,
    settings: Settings,
    on_progress: ProgressFn | None = None,
    fine_tune: str = "auto",
) -> ChangeResult:
    """Add the zip's images to the catalog; an item whose name exists already is replaced.

    Only images whose bytes the current version does not hold go through the encoder. With a kept
    head, new images go through the version's own head; `fine_tune=always` trains the head again
    on every item's stored backbone vectors (no forward pass for the old ones).
    """
    report = on_progress or quiet
    report(Progress("ingest", 0, 0))
    encoder = steps.converted_encoder(steps.load_encoder(spec, settings, storage), settings, report)
    first = read_base(storage, spec)
    if first is not None:
        _check_encoder(first, encoder.fingerprint, spec)
    with steps.work_folder(settings, spec.name, "add") as tmp, ingest.open_zip(zip_path) as zf:
        plan = steps.plan_zip(zf, settings)
        add = AddItems(spec, storage, settings, encoder, plan, Path(tmp), fine_tune, report)
        add.embed(zf, first)
        report(Progress("publish", 0, 1))
        result = publish_with_rebase(storage, spec, settings, add)
        report(Progress("publish", 1, 1))
    return result


@dataclass
class AddItems:
    """An add: embed once (`embed`), then build on whichever version is current (`build`)."""

    spec: EndpointSpec
    storage: Storage
    settings: Settings
    encoder: convert.Verified
    plan: ingest.ZipPlan
    embed_dir: Path  # the new images' originals, and nothing else
    fine_tune: str
    report: ProgressFn
    embedded: embedding.Embedded = field(default_factory=embedding.Embedded)
    vectors = True

    @property
    def retrain(self) -> bool:
        return self.fine_tune == "always"  # else the base's head (if any) is kept as it is

    def embed(self, zf: Any, first: Base | None) -> None:
        """Embed the new images (those the current version does not hold) once, whatever the rebases."""
        # Mirrored vectors for the new images too when the catalog keeps them (head augmentation).
        keeps_mirrored = first is not None and first.rows.mirrored is not None
        head_config = self.spec.head if self.retrain or keeps_mirrored else None
        cache = VectorCache.of(first.rows if first else None)
        thumbnail = self.spec.head.thumbnail
        self.embedded = embedding.embed(
            zf,
            self.plan,
            self.embed_dir,
            self.encoder,
            self.settings,
            head_config,
            thumbnail,
            self.report,
            cache,
        )
        if not self.embedded.accepted:
            raise TrainingError(
                f"the zip holds no usable image ({len(self.skipped)} files skipped)", self.skipped
            )

    @property
    def skipped(self) -> list[ingest.Skipped]:
        return [*self.plan.skipped, *self.embedded.skipped]

    def build(self, base: Base | None, staging: Path) -> Built:
        if base is not None:
            _check_encoder(base, self.encoder.fingerprint, self.spec)
        new, kept, merged = self.merge(base)
        head, evaluation = self.head_for(base, merged)
        steps.stage_rows(merged, head, staging, self.spec.n_trees, self.report)
        carried = self.stage_files(base, new, kept, head, staging)
        runtime = steps.stage_converted(self.encoder, staging, self.settings, self.embed_dir / "images")
        manifest = self.manifest(base, merged, new, head, evaluation, runtime)
        return Built(manifest, carried, self.result(base, new, manifest, evaluation, runtime))

    def merge(self, base: Base | None) -> tuple[Catalog, Catalog | None, Catalog]:
        """The new rows (ids kept for names the base holds), the base's rows kept, and both together."""
        base_rows = base.rows if base else None
        thumb_dim = 3 * self.spec.head.thumbnail**2
        new = merge.to_rows(
            self.embedded, self.plan, base_rows, thumb_dim, merge.reserver(self.storage, self.spec.name)
        )
        replaced = {new.item_name(r) for r in range(new.count)}
        kept = base_rows.take(merge.rows_kept(base_rows, replaced)) if base_rows is not None else None
        if self.retrain and kept is not None:
            kept.vectors = kept.backbone  # the head is trained again: every vector is new
        elif base is not None and base.head is not None:  # the version's own head embeds the new images
            new.vectors = base.head.embed(new.backbone, new.thumbs)
        merged = kept.extend(new) if kept is not None else new
        merged.next_id = new.next_id  # base.next_id plus the ids given out now
        return new, kept, merged

    def head_for(self, base: Base | None, merged: Catalog) -> tuple[Head | None, dict[str, Any]]:
        """The base's head as it is, or (fine_tune=always) a head trained again on every row."""
        if not self.retrain:
            return (base.head if base else None), {}
        outcome = steps.fine_tune("always", merged, self.spec.head, self.report)
        merged.vectors = (
            outcome.head.embed(merged.backbone, merged.thumbs) if outcome.head else merged.backbone
        )
        return outcome.head, outcome.evaluation

    def stage_files(
        self, base: Base | None, new: Catalog, kept: Catalog | None, head: Head | None, staging: Path
    ) -> Carried:
        """The new images (linked from the embed folder) and the head; the base's files kept as they are."""
        (staging / "images").mkdir(exist_ok=True)
        for name in {e["image"] for e in new.entries}:
            os.link(self.embed_dir / name, staging / name)
        carried = (
            base.carry(self.spec.name, {e["image"] for e in kept.entries} if kept else ()) if base else {}
        )
        if head is not None and (self.retrain or base is None):
            head.save(staging)
        elif head is not None and base is not None:
            carried.update(base.carry(self.spec.name, HEAD_FILES))
        return carried

    def manifest(
        self,
        base: Base | None,
        merged: Catalog,
        new: Catalog,
        head: Head | None,
        evaluation: dict[str, Any],
        runtime: dict[str, Any],
    ) -> dict[str, Any]:
        before = base.manifest if base else {}
        items = sorted({int(i) for i in new.items})
        return {
            **before,
            "encoder": {**self.encoder.describe(), "handle": self.spec.encoder.source},
            "runtime": runtime,
            "head": steps.head_manifest(head),
            "fine_tune": self.fine_tune
            if self.retrain
            else (before.get("fine_tune") if base else self.fine_tune),
            "evaluation": evaluation or before.get("evaluation", {}),
            **steps.index_manifest(self.spec, int(merged.vectors.shape[1])),
            **summary(merged),
            "change": {
                "kind": "add",
                "embedded": self.embedded.embedded,
                "reused": new.count - self.embedded.embedded,
                "items": items,
            },
        }

    def result(
        self,
        base: Base | None,
        new: Catalog,
        manifest: dict[str, Any],
        evaluation: dict[str, Any],
        runtime: dict[str, Any],
    ) -> ChangeResult:
        items = sorted({int(i) for i in new.items})
        counts = {
            "items": items,
            "images": new.count,
            "embedded": self.embedded.embedded,
            "reused": new.count - self.embedded.embedded,
            "skipped": len(self.skipped),
            "replaced": sorted(set(items) & merge.live_ids(base.rows if base else None)),
        }
        return ChangeResult(
            "", "add", items, manifest["count"], counts, self.skipped, evaluation, runtime=runtime
        )


def _check_encoder(base: Base, fingerprint: str, spec: EndpointSpec) -> None:
    if base.manifest.get("encoder", {}).get("fingerprint") != fingerprint:
        raise ConflictError(
            f"{spec.name}'s encoder is not the one its current version was built with; "
            f"train the endpoint again (POST /{spec.name}/train) before changing items"
        )
    if base.rows.thumbs.shape[1] != 3 * spec.head.thumbnail**2:
        raise ConflictError(f"{spec.name}'s head thumbnail size changed; train the endpoint again")


# --- delete --------------------------------------------------------------------------------------


def delete_items(
    spec: EndpointSpec, storage: Storage, settings: Settings, ids: list[int], names: list[str]
) -> ChangeResult:
    """Delete items by id or name. Any unknown one is a 404 and nothing is published."""
    return publish_with_rebase(storage, spec, settings, DeleteItems(spec, storage, ids, names))


@dataclass
class DeleteItems:
    spec: EndpointSpec
    storage: Storage
    ids: list[int]
    names: list[str]
    vectors = False  # only when the tombstones grow too many (read then)

    def build(self, base: Base | None, staging: Path) -> Built:
        if base is None:
            raise ItemNotFoundError(f"{self.spec.name} has no trained version: nothing to delete")
        doomed = resolve(base.rows, self.ids, self.names, self.spec.name)
        items = base.rows.items.copy()
        items[np.isin(items, list(doomed))] = DELETED
        tombstones = int(np.sum(items == DELETED))
        if tombstones == len(items):
            raise ConflictError(
                f"deleting {len(doomed)} item(s) would leave {self.spec.name} empty; train it again instead"
            )
        if tombstones > MAX_TOMBSTONE_SHARE * len(items):
            after, carried = self.rebuild(base, items, staging)
        else:
            after, carried = self.mark(base, items, staging)
        if base.manifest.get("head"):
            carried.update(base.carry(self.spec.name, HEAD_FILES))
        manifest = {**base.manifest, **summary(after), "change": {"kind": "delete", "items": sorted(doomed)}}
        return Built(manifest, carried, ChangeResult("", "delete", sorted(doomed), manifest["count"]))

    def rebuild(self, base: Base, items: np.ndarray, staging: Path) -> tuple[Catalog, Carried]:
        """Too many dead rows: a new index over the live ones (this needs the vectors)."""
        full = rows.read(self.storage, self.spec.name, base.pointer.version or "", base.manifest)
        after = Catalog(**{**full.__dict__, "items": items})
        after = after.take(after.live())
        rows.write(after, staging, self.spec.n_trees, head=bool(base.manifest.get("head")))
        return after, base.carry(self.spec.name, {e["image"] for e in after.entries})

    def mark(self, base: Base, items: np.ndarray, staging: Path) -> tuple[Catalog, Carried]:
        """Rows stay where they are, marked deleted; only the maps change. The index is the base's."""
        after = Catalog(**{**base.rows.__dict__, "items": items})
        np.save(staging / rows.ROWS, items, allow_pickle=False)
        rows.write_maps(after, staging)
        keep = {*INDEX_FILES, *(base.rows.entries[r]["image"] for r in after.live())}
        return after, base.carry(self.spec.name, keep)


def resolve(catalog: Catalog, ids: list[int], names: list[str], endpoint: str) -> set[int]:
    """The item ids named by id or by name; any unknown one is a 404 (nothing is changed)."""
    live = merge.live_ids(catalog)
    by_name = catalog.item_ids_by_name()
    unknown = [str(i) for i in ids if i not in live] + [n for n in names if n not in by_name]
    if unknown:
        raise ItemNotFoundError(f"no item {', '.join(unknown[:10])} in {endpoint}; nothing was changed")
    return set(ids) | {by_name[n] for n in names}


# --- edit ----------------------------------------------------------------------------------------


def edit_item(
    spec: EndpointSpec,
    storage: Storage,
    settings: Settings,
    item_id: int,
    label: Any = UNSET,
    metadata: dict[str, Any] | None = None,
) -> ChangeResult:
    """Change an item's label and/or metadata (a JSON merge patch: null removes a field). The
    vectors and the index are the base's: only the maps change."""
    if label is not UNSET and label is not None and not isinstance(label, str):
        raise InvalidParameterError("label must be a string or null", errors={"label": ["Not a string."]})
    if metadata is not None:
        ingest.check_metadata(metadata)
    return publish_with_rebase(storage, spec, settings, EditItem(spec, item_id, label, metadata))


@dataclass
class EditItem:
    spec: EndpointSpec
    item_id: int
    label: Any
    metadata: dict[str, Any] | None
    vectors = False

    def build(self, base: Base | None, staging: Path) -> Built:
        if base is None:
            raise ItemNotFoundError(f"{self.spec.name} has no trained version")
        catalog = base.rows
        resolve(catalog, [self.item_id], [], self.spec.name)
        entries = list(catalog.entries)
        for r in np.flatnonzero(catalog.items == self.item_id):
            entries[r] = self.edited(entries[r])
        after = Catalog(**{**catalog.__dict__, "entries": entries})
        rows.write_maps(after, staging)
        keep = {*INDEX_FILES, rows.ROWS, *(catalog.entries[r]["image"] for r in catalog.live())}
        keep |= set(HEAD_FILES) if base.manifest.get("head") else set()
        manifest = {**base.manifest, **summary(after), "change": {"kind": "edit", "items": [self.item_id]}}
        result = ChangeResult("", "edit", [self.item_id], manifest["count"])
        return Built(manifest, base.carry(self.spec.name, keep), result)

    def edited(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry = dict(entry)
        if self.label is not UNSET:
            entry["label"] = self.label
        if self.metadata is not None:
            merged = dict(entry.get("metadata") or {})
            for key, value in self.metadata.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            entry["metadata"] = ingest.check_metadata(merged)  # the result stays within bounds too
        return entry
