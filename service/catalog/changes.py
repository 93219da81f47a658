"""Catalogue changes: add or replace items, delete items, edit an item's label and metadata.

Each change is built on the current version and published as a new version by the same path as
a train (immutable folder, manifest, compare-and-swap of CURRENT, retention, rollback). Files a
change does not alter (the index, vectors and images of a delete or an edit; the images of the
items an add keeps) are copied inside the store, never uploaded again.

Concurrent changes never lose each other: a change whose compare-and-swap fails is built again
on the version that won (its new images are embedded once; only the merge is redone).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from service.catalog import catalogue, finetune, ingest, training
from service.catalog.catalogue import DELETED, Catalogue, VectorCache
from service.catalog.head import HEAD_FILES, Head
from service.core.config import Settings
from service.core.endpoint import EndpointSpec
from service.core.errors import ConflictError, InvalidParameterError, ItemNotFoundError, TrainingError
from service.encoders import litert
from service.storage import KeyNotFoundError, Storage, versions

log = logging.getLogger(__name__)

# A change rebuilt this many times in a row (each time another change won the race) gives up.
MAX_REBASES = 20
# Deleted rows stay in the index as tombstones until they are this share of it; then a delete
# rebuilds the index without them.
MAX_TOMBSTONE_SHARE = 0.2


@dataclass
class ChangeResult:
    version: str
    kind: str  # "add", "delete", "edit"
    items: list[int]  # the ids the change added, replaced, deleted or edited
    count: int  # items in the new version
    counts: dict[str, Any] = field(default_factory=dict)
    skipped: list[ingest.Skipped] = field(default_factory=list)
    evaluation: dict[str, Any] = field(default_factory=dict)
    rebases: int = 0
    runtime: dict[str, Any] = field(default_factory=dict)  # which runtime serves it, and why


@dataclass
class _Base:
    """The version a change is built on."""

    pointer: versions.Pointer
    manifest: dict[str, Any]
    rows: Catalogue
    head: Head | None


def _read_base(
    storage: Storage, spec: EndpointSpec, settings: Settings, vectors: bool = True
) -> _Base | None:
    """The current version; without `vectors`, only its maps and ids (an edit, most deletes)."""
    pointer = versions.read_current(storage, spec.name)
    if pointer.version is None:
        return None
    manifest = versions.read_manifest(storage, spec.name, pointer.version)
    rows = catalogue.read(storage, spec.name, pointer.version, manifest, vectors=vectors)
    head = None
    if manifest.get("head") and vectors:
        with tempfile.TemporaryDirectory(prefix="head-") as tmp:
            prefix = versions.version_prefix(spec.name, pointer.version)
            for name in HEAD_FILES:
                storage.download(prefix + name, Path(tmp) / name)
            head = Head.load(Path(tmp))
    return _Base(pointer, manifest, rows, head)


def _publish_with_rebase(
    storage: Storage,
    spec: EndpointSpec,
    settings: Settings,
    build: Callable[[_Base | None, Path], tuple[dict[str, Any], dict[str, tuple[str, dict[str, Any]]], Any]],
    vectors: bool = True,
) -> tuple[str, Any, int]:
    """Build a change on the current version and publish it; on a lost race, build it again on the
    winner. `build(base, staging)` fills `staging` and returns (manifest, carried files, result)."""
    for attempt in range(MAX_REBASES):
        try:
            base = _read_base(storage, spec, settings, vectors)
        except KeyNotFoundError:
            if attempt + 1 < MAX_REBASES:  # pruned while we read it: a newer version is current
                continue
            raise
        version = versions.new_version_id()
        with training.work_folder(settings, spec.name, "change") as tmp:
            try:
                manifest, carried, result = build(base, Path(tmp))
            except KeyNotFoundError:
                if versions.read_current(storage, spec.name).tag == (base.pointer.tag if base else None):
                    raise
                continue  # the base was pruned while we read it: build on the newer version
            served_by = (manifest.get("runtime") or {}).get("name")
            if (
                base is not None
                and served_by == litert.RUNTIME
                and not (Path(tmp) / litert.MODEL_FILE).exists()
            ):
                # A change that embeds nothing keeps the base's converted encoder, as it is.
                carried = {**_carry(base, spec.name, [litert.MODEL_FILE]), **carried}
            manifest = {
                **manifest,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "base": base.pointer.version if base else None,
                "lineage": (base.manifest.get("lineage") or base.pointer.version) if base else version,
            }
            try:
                versions.publish(
                    storage,
                    spec.name,
                    version,
                    Path(tmp),
                    manifest,
                    base=base.pointer if base else versions.Pointer(None, None),
                    carried=carried,
                )
            except versions.RebaseError:
                training.discard(storage, spec.name, version)
                log.info("%s: a change lost the race to %s; building it again", spec.name, version)
                continue
            except KeyNotFoundError:
                # A file of the base went missing mid-copy: pruned, so no longer current. Rebase.
                training.discard(storage, spec.name, version)
                if versions.read_current(storage, spec.name).tag == (base.pointer.tag if base else None):
                    raise
                continue
            except Exception:
                training.discard(storage, spec.name, version)
                raise
        versions.note_published(settings.cache_dir, spec.name, version)
        training.prune(storage, spec.name, settings.keep_versions)
        return version, result, attempt
    raise ConflictError(f"{spec.name} changed {MAX_REBASES} times while this change was built; send it again")


def _carry(base: _Base, endpoint: str, names: Iterable[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Files of the base version that the new one keeps as they are (copied inside the store)."""
    prefix = versions.version_prefix(endpoint, base.pointer.version or "")
    files = base.manifest["files"]
    return {name: (prefix + name, files[name]) for name in names if name in files}


def _summary(rows: Catalogue) -> dict[str, Any]:
    live = rows.live()
    labels = Counter(rows.entries[r]["label"] for r in live if rows.entries[r]["label"] is not None)
    return {**catalogue.manifest_summary(rows), "labels": dict(sorted(labels.items()))}


# --- add or replace ------------------------------------------------------------------------------


def add_items(
    spec: EndpointSpec,
    zip_path: Path,
    storage: Storage,
    settings: Settings,
    on_progress: training.ProgressFn | None = None,
    fine_tune: str = "auto",
) -> ChangeResult:
    """Add the zip's images to the catalogue; an item whose name exists already is replaced.

    Only images whose bytes the current version does not hold go through the encoder. With a kept
    head, new images go through the version's own head; `fine_tune=always` trains the head again
    on every item's stored backbone vectors (no forward pass for the old ones).
    """
    report = on_progress or (lambda p: None)
    report(training.Progress("ingest", 0, 0))
    encoder = training.converted_encoder(training.load_encoder(spec, settings, storage), settings, report)
    thumb_dim = 3 * spec.head.thumbnail**2
    first = _read_base(storage, spec, settings)
    if first is not None:
        _check_encoder(first, encoder.fingerprint, thumb_dim, spec.name)
    with training.work_folder(settings, spec.name, "add") as tmp, ingest.open_zip(zip_path) as zf:
        embed_dir = Path(tmp)
        plan = ingest.plan(zf, ingest.ZipLimits.from_settings(settings))
        retrain = fine_tune == "always"  # else the base's head (if any) is kept as it is
        # Mirrored vectors for the new images too when the catalogue keeps them (head augmentation).
        keeps_mirrored = first is not None and first.rows.mirrored is not None
        head_config = spec.head if retrain or keeps_mirrored else None
        cache = VectorCache.of(first.rows if first else None)
        embedded = training.embed(
            zf, plan, embed_dir, encoder, settings, head_config, spec.head.thumbnail, report, cache
        )
        skipped = [*plan.skipped, *embedded.skipped]
        if not embedded.accepted:
            raise TrainingError(f"the zip holds no usable image ({len(skipped)} files skipped)", skipped)

        def build(base: _Base | None, staging: Path) -> tuple[dict[str, Any], dict[str, Any], ChangeResult]:
            if base is not None:
                _check_encoder(base, encoder.fingerprint, thumb_dim, spec.name)
            new = training.rows_of(
                embedded, plan, base.rows if base else None, thumb_dim, training.reserver(storage, spec.name)
            )
            new_items = {new.item_name(r) for r in range(new.count)}
            kept = base.rows.take(_rows_kept(base.rows, new_items)) if base else None
            head = base.head if base else None
            if retrain and kept is not None:
                kept.vectors = kept.backbone  # the head is trained again: every vector is new
            elif head is not None:  # the version's own head embeds the new images
                new.vectors = head.embed(new.backbone, new.thumbs)
            merged = kept.extend(new) if kept is not None else new
            merged.next_id = new.next_id  # base.next_id plus the ids given out now
            evaluation: dict[str, Any] = {}
            if retrain:
                report(training.Progress("fine-tune", 0, 1))
                labels = [e["label"] for e in merged.entries]
                outcome = finetune.fine_tune(
                    "always",
                    merged.backbone,
                    merged.thumbs,
                    labels,
                    spec.head,
                    merged.mirrored,
                    None
                    if merged.mirrored is None
                    else training.mirror_thumbs(merged.thumbs, spec.head.thumbnail),
                )
                head, evaluation = outcome.head, outcome.evaluation
                merged.vectors = head.embed(merged.backbone, merged.thumbs) if head else merged.backbone
                report(training.Progress("fine-tune", 1, 1))
            report(training.Progress("index", 0, merged.count))
            catalogue.write(merged, staging, spec.n_trees, head=head is not None)
            (staging / "images").mkdir(exist_ok=True)
            for name in {e["image"] for e in new.entries}:
                os.link(embed_dir / name, staging / name)
            carried = {}
            if base is not None:
                carried = _carry(base, spec.name, {e["image"] for e in kept.entries} if kept else ())
            if head is not None:
                if retrain or base is None:
                    head.save(staging)
                else:
                    carried.update(_carry(base, spec.name, HEAD_FILES))
            runtime = training.stage_converted(encoder, staging, settings, embed_dir / "images")
            manifest = {
                **(base.manifest if base else {}),
                "encoder": {**encoder.describe(), "handle": spec.encoder.source},
                "runtime": runtime,
                "head": training.head_manifest(head),
                "fine_tune": fine_tune
                if retrain
                else (base.manifest.get("fine_tune") if base else fine_tune),
                "evaluation": evaluation or (base.manifest.get("evaluation", {}) if base else {}),
                "dim": int(merged.vectors.shape[1]),
                "metric": spec.metric,
                "n_trees": spec.n_trees,
                "search_k": spec.search_k,
                **_summary(merged),
                "change": {
                    "kind": "add",
                    "embedded": embedded.embedded,
                    "reused": new.count - embedded.embedded,
                    "items": sorted({int(i) for i in new.items}),
                },
            }
            manifest.pop("files", None)
            result = ChangeResult(
                version="",
                kind="add",
                items=sorted({int(i) for i in new.items}),
                count=manifest["count"],
                counts={
                    "items": sorted({int(i) for i in new.items}),
                    "images": new.count,
                    "embedded": embedded.embedded,
                    "reused": new.count - embedded.embedded,
                    "skipped": len(skipped),
                    "replaced": sorted({int(i) for i in new.items} & _live_ids(base.rows if base else None)),
                },
                skipped=skipped,
                evaluation=evaluation,
                runtime=runtime,
            )
            return manifest, carried, result

        report(training.Progress("publish", 0, 1))
        version, result, rebases = _publish_with_rebase(storage, spec, settings, build)
        report(training.Progress("publish", 1, 1))
    result.version, result.rebases = version, rebases
    return result


def _check_encoder(base: _Base, fingerprint: str, thumb_dim: int, endpoint: str) -> None:
    if base.manifest.get("encoder", {}).get("fingerprint") != fingerprint:
        raise ConflictError(
            f"{endpoint}'s encoder is not the one its current version was built with; "
            f"train the endpoint again (POST /{endpoint}/train) before changing items"
        )
    if base.rows.thumbs.shape[1] != thumb_dim:
        raise ConflictError(f"{endpoint}'s head thumbnail size changed; train the endpoint again")


def _rows_kept(rows: Catalogue, replaced: set[str]) -> np.ndarray:
    """The live rows of the items a change keeps (tombstones are dropped: the index is rebuilt);
    an item named again is replaced whole, all its photos."""
    return np.array([r for r in rows.live() if rows.item_name(r) not in replaced], dtype=np.int64)


def _live_ids(rows: Catalogue | None) -> set[int]:
    return set() if rows is None else {int(i) for i in rows.items[rows.live()]}


# --- delete --------------------------------------------------------------------------------------


def delete_items(
    spec: EndpointSpec, storage: Storage, settings: Settings, ids: list[int], names: list[str]
) -> ChangeResult:
    """Delete items by id or name. Any unknown one is a 404 and nothing is published."""

    def build(base: _Base | None, staging: Path) -> tuple[dict[str, Any], dict[str, Any], ChangeResult]:
        if base is None:
            raise ItemNotFoundError(f"{spec.name} has no trained version: nothing to delete")
        rows = base.rows
        doomed = _resolve(rows, ids, names, spec.name)
        items = rows.items.copy()
        items[np.isin(items, list(doomed))] = DELETED
        after = Catalogue(**{**rows.__dict__, "items": items})
        tombstones = int(np.sum(items == DELETED))
        if tombstones > MAX_TOMBSTONE_SHARE * len(items) or tombstones == len(items):
            if tombstones == len(items):
                raise ConflictError(
                    f"deleting {len(doomed)} item(s) would leave {spec.name} empty; train it again instead"
                )
            # Too many dead rows: rebuild the index over the live ones (this needs the vectors).
            full = catalogue.read(storage, spec.name, base.pointer.version or "", base.manifest)
            after = Catalogue(**{**full.__dict__, "items": items})
            after = after.take(after.live())
            catalogue.write(after, staging, spec.n_trees, head=bool(base.manifest.get("head")))
            carried = _carry(base, spec.name, {e["image"] for e in after.entries})
        else:
            # Rows stay where they are; only the maps change. The index is the base's.
            np.save(staging / catalogue.ROWS, items, allow_pickle=False)
            catalogue.write_maps(after, staging)
            keep = {"index.ann", "vectors.npy", "backbone.npy", "thumbs.npy", "mirrored.npy"}
            keep |= {rows.entries[r]["image"] for r in after.live()}
            carried = _carry(base, spec.name, keep)
        if base.manifest.get("head"):
            carried.update(_carry(base, spec.name, HEAD_FILES))
        manifest = {**base.manifest, **_summary(after), "change": {"kind": "delete", "items": sorted(doomed)}}
        manifest.pop("files", None)
        result = ChangeResult("", "delete", sorted(doomed), manifest["count"])
        return manifest, carried, result

    version, result, rebases = _publish_with_rebase(storage, spec, settings, build, vectors=False)
    result.version, result.rebases = version, rebases
    return result


def _resolve(rows: Catalogue, ids: list[int], names: list[str], endpoint: str) -> set[int]:
    live = _live_ids(rows)
    by_name = rows.item_ids_by_name()
    unknown = [str(i) for i in ids if i not in live] + [n for n in names if n not in by_name]
    if unknown:
        raise ItemNotFoundError(f"no item {', '.join(unknown[:10])} in {endpoint}; nothing was changed")
    return set(ids) | {by_name[n] for n in names}


# --- edit ----------------------------------------------------------------------------------------

UNSET: Any = object()


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

    def build(base: _Base | None, staging: Path) -> tuple[dict[str, Any], dict[str, Any], ChangeResult]:
        if base is None:
            raise ItemNotFoundError(f"{spec.name} has no trained version")
        rows = base.rows
        _resolve(rows, [item_id], [], spec.name)
        entries = list(rows.entries)
        for r in np.flatnonzero(rows.items == item_id):
            entry = dict(entries[r])
            if label is not UNSET:
                entry["label"] = label
            if metadata is not None:
                merged = dict(entry.get("metadata") or {})
                for key, value in metadata.items():
                    if value is None:
                        merged.pop(key, None)
                    else:
                        merged[key] = value
                entry["metadata"] = ingest.check_metadata(merged)  # the result stays within bounds too
            entries[r] = entry
        after = Catalogue(**{**rows.__dict__, "entries": entries})
        catalogue.write_maps(after, staging)
        keep = {"index.ann", "vectors.npy", "backbone.npy", "thumbs.npy", "mirrored.npy", catalogue.ROWS}
        keep |= {rows.entries[r]["image"] for r in rows.live()}
        keep |= set(HEAD_FILES) if base.manifest.get("head") else set()
        carried = _carry(base, spec.name, keep)
        manifest = {**base.manifest, **_summary(after), "change": {"kind": "edit", "items": [item_id]}}
        manifest.pop("files", None)
        return manifest, carried, ChangeResult("", "edit", [item_id], manifest["count"])

    version, result, rebases = _publish_with_rebase(storage, spec, settings, build, vectors=False)
    result.version, result.rebases = version, rebases
    return result
