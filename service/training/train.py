"""A full train: every image of a zip becomes the catalog of a new version (plan, embed, merge,
fine-tune, stage, publish). Images a retained version holds already are not embedded again, and
changes published while the train ran are applied to its result rather than lost."""

from __future__ import annotations

import contextlib
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from service.catalog import images, ingest
from service.catalog.rows import Catalog
from service.catalog.segment import to_catalog
from service.core.config import Settings
from service.core.endpoint import EndpointSpec
from service.core.errors import ConflictError, TrainingError
from service.encoders import convert, litert
from service.storage import Storage, blobs, versions
from service.storage.blobs import BlobCache
from service.storage.manifest import BlobRef, Manifest
from service.training import embedding, finetune, merge, screen, steps
from service.training.base import Base, read_base
from service.training.cache import VectorCache
from service.training.diff import diff
from service.training.results import Progress, ProgressFn, TrainResult, quiet
from service.training.sharded import Gathered
from service.training.stage import Stager

# A train rebuilt this many times in a row (each time a change was published meanwhile) gives up.
MAX_REBASES = 10


@dataclass
class _Run:
    """What one train knows as it goes."""

    spec: EndpointSpec
    storage: Storage
    settings: Settings
    cache: BlobCache
    version: str
    fine_tune: str
    report: ProgressFn
    zip_name: str
    encoder: convert.Verified | litert.LiteEncoder | None = None
    gathered: Gathered | None = None  # a sharded train: the shards' outputs stand for the embed step
    plan: ingest.ZipPlan | None = None
    embedded: embedding.Embedded = field(default_factory=embedding.Embedded)
    outcome: finetune.Outcome | None = None
    wants_head: bool = False  # the zip's labels call for a head (decided before embedding)
    lease: blobs.Lease | None = None  # held while it builds: checked before it publishes
    on_duplicate: str = "allow"  # allow | flag | skip the zip's duplicates of each other (screen.py)
    duplicates: dict[str, Any] | None = None  # what screening found
    dropped: int = 0  # images screening left out (on_duplicate=skip)

    @property
    def thumb_dim(self) -> int:
        return 3 * self.spec.head.thumbnail**2


def train(
    spec: EndpointSpec,
    zip_path: Path | None,
    storage: Storage,
    settings: Settings,
    on_progress: ProgressFn | None = None,
    version: str | None = None,
    fine_tune: str = "auto",
    gathered: Gathered | None = None,
    on_duplicate: str = "allow",
) -> TrainResult:
    """Embed every image in the zip, fine-tune a head if the labels allow, index, and publish.
    `gathered`: a sharded train's embedded images (the worker tier embedded them; `zip_path` unused).
    `on_duplicate`: flag (list) or skip (leave out) images that copy an older item of the zip."""
    run = _Run(
        spec,
        storage,
        settings,
        steps.blob_cache(storage, settings),
        version or versions.new_version_id(),
        fine_tune,
        on_progress or quiet,
        gathered.zip_name if gathered else Path(str(zip_path)).name,
        gathered=gathered,
        on_duplicate=on_duplicate,
    )
    run.report(Progress("ingest", 0, 0))
    with (
        blobs.lease(storage, spec.name) as held,
        steps.work_folder(settings, spec.name) as tmp,
        contextlib.nullcontext() if gathered else ingest.open_zip(Path(str(zip_path))) as zf,
    ):
        if gathered is not None:
            run.plan, run.encoder = gathered.plan, gathered.encoder
        else:
            assert zf is not None
            run.plan = steps.plan_zip(zf, settings)
            run.encoder = steps.converted_encoder(
                steps.load_encoder(spec, settings, storage), settings, run.report
            )
        base = read_base(storage, spec.name, run.cache, spec.search_k)
        _embed(run, zf, Path(tmp))
        catalog = merge.to_rows(
            run.embedded,
            run.plan,
            _id_of(base),
            base.manifest.next_id if base else 0,
            run.thumb_dim,
            merge.reserver(storage, spec.name),
        )
        run.outcome = _fine_tune(run, catalog)
        catalog = _screen(run, catalog)
        run.lease = held
        manifest = _publish(run, catalog, base, Path(tmp))
    steps.published(storage, settings, spec.name, run.version)
    return TrainResult(
        run.version,
        manifest.rows,
        _counts(run, manifest),
        _skipped(run),
        manifest.to_json(),
        run.outcome.evaluation,
        dict(manifest.runtime),
    )


def _id_of(base: Base | None) -> merge.IdOf:
    """The item id a name has in `base`: a train keeps the ids of the names it finds again."""

    def id_of(name: str) -> int | None:
        found = base.view.named_rows(name) if base is not None else None
        return None if found is None else int(base.view.segments[found.segment].items[found.rows[0]])  # type: ignore[union-attr]

    return id_of


def _embed(run: _Run, zf: zipfile.ZipFile | None, folder: Path) -> None:
    """Embed the zip's images; the retained versions' vectors stand in for images they hold."""
    assert run.plan is not None and run.encoder is not None
    run.wants_head = finetune.plan(run.fine_tune, [e.label for e in run.plan.entries], run.spec.head)
    if run.gathered is not None:
        run.embedded = run.gathered.embedded
    else:
        assert zf is not None
        cache = VectorCache.of_versions(
            run.storage, run.spec.name, run.cache, run.encoder.fingerprint, run.thumb_dim
        )
        head_config = run.spec.head if run.wants_head else None
        run.embedded = embedding.embed(
            zf,
            run.plan,
            folder,
            run.encoder,
            run.settings,
            head_config,
            run.spec.head.thumbnail,
            run.report,
            cache,
        )
    if not run.embedded.accepted:
        skipped = _skipped(run)
        raise TrainingError(
            f"the zip holds no usable image ({len(skipped)} files skipped; "
            f"images must be {images.SUPPORTED})",
            skipped,
        )


def _skipped(run: _Run) -> list[ingest.Skipped]:
    return [*(run.plan.skipped if run.plan else []), *run.embedded.skipped]


def _fine_tune(run: _Run, catalog: Catalog) -> finetune.Outcome:
    """A head, when the mode and the zip's labels call for one (its vectors replace the
    backbone's); finetune.fine_tune decides on the images that decoded."""
    if not run.wants_head:
        return finetune.not_trained(run.fine_tune, run.spec.head)
    outcome = steps.fine_tune(run.fine_tune, catalog, run.spec.head, run.report)
    if outcome.head is not None:
        catalog.vectors = outcome.head.embed(catalog.backbone, catalog.thumbs)
    return outcome


def _screen(run: _Run, catalog: Catalog) -> Catalog:
    """on_duplicate=flag|skip: the zip's images that copy an older item of the same zip (a train
    replaces the catalogue, so nothing else is older), listed; with skip, left out."""
    if run.on_duplicate == "allow":
        return catalog
    run.report(Progress("duplicates", 0, catalog.count))
    threshold = run.spec.duplicate_threshold
    found = screen.screen(
        catalog, catalog.vectors, None, run.outcome is not None and run.outcome.head is not None, threshold
    )
    run.duplicates = screen.describe(catalog, found, run.on_duplicate, threshold)
    if run.on_duplicate == "skip" and found:
        dropped = {d.row for d in found}
        run.dropped = len(dropped)
        catalog = catalog.take(
            np.array([r for r in range(catalog.count) if r not in dropped], dtype=np.int64)
        )
    run.report(Progress("duplicates", catalog.count, catalog.count))
    return catalog


def _publish(run: _Run, catalog: Catalog, base: Base | None, work: Path) -> Manifest:
    """Stage and publish; if changes to the same catalog were published meanwhile, apply them to
    this train's rows and publish again on the version that carries them."""
    run.report(Progress("publish", 0, 1))
    for attempt in range(MAX_REBASES):
        stager = Stager(work / f"stage-{attempt}")
        manifest = _stage(run, catalog, base, stager)
        pointer = base.pointer if base else versions.Pointer(None, None)
        known = base.known() | _images_held(run, base) if base else set()
        try:
            versions.publish(
                run.storage, manifest, stager.files, known, base=pointer, change=False, lease=run.lease
            )
        except versions.RebaseError:
            versions.withdraw(run.storage, run.spec.name, run.version)
            newer = read_base(run.storage, run.spec.name, run.cache, run.spec.search_k)
            if base is None or newer is None:
                raise
            catalog = _rebase(run, catalog, base, newer)
            base = newer
            continue
        except BaseException:
            versions.withdraw(run.storage, run.spec.name, run.version)
            raise
        run.report(Progress("publish", 1, 1))
        return manifest
    raise ConflictError(
        f"{run.spec.name} changed {MAX_REBASES} times while this train published; train again"
    )


def _images_held(run: _Run, base: Base) -> set[str]:
    """The zip's images the base version holds already (not uploaded again)."""
    return {a.sha256 for a in run.embedded.accepted if base.view.find_image(a.sha256) is not None}


def _stage(run: _Run, catalog: Catalog, base: Base | None, stager: Stager) -> Manifest:
    """The version's files: its images, one segment of every row, the head, the converted encoder."""
    assert run.encoder is not None and run.outcome is not None
    images_dir = stager.folder.parent / "images"
    if not run.embedded.stored:  # a sharded train's workers stored the originals already
        kept = {e["sha256"] for e in catalog.entries}  # screening may have left some out
        for accepted in run.embedded.accepted:
            if accepted.sha256 in kept:
                stager.image(images_dir / Path(accepted.image).name, accepted.sha256)
    run.report(Progress("index", 0, catalog.count))
    segment = stager.segment(catalog, run.spec.n_trees, head=run.outcome.head is not None)
    runtime: dict[str, Any]
    model: BlobRef | None
    fused: Path | None = None
    if run.gathered is not None:  # the converted encoder every shard embedded with, in the store
        runtime, model = run.gathered.runtime, run.gathered.model
        if run.outcome.head is not None:  # no TensorFlow backbone here to fuse the head with
            runtime = {**runtime, "head": {"fused": False, "reason": "a sharded train"}}
    else:
        assert isinstance(run.encoder, convert.Verified)
        job_images = [images_dir / Path(a.image).name for a in run.embedded.accepted]
        runtime, model = steps.stage_converted(run.encoder, stager, run.settings, job_images)
        if run.outcome.head is not None:
            run.report(Progress("fuse", 0, 1))
            fused, how = steps.fuse_head(
                run.encoder, run.outcome.head, run.settings, stager.folder / "fused", job_images
            )
            runtime = {**runtime, "head": how}
            run.report(Progress("fuse", 1, 1))
    head = stager.head(run.outcome.head, fused) if run.outcome.head is not None else None
    return _manifest(run, catalog, segment, head, runtime, model, base)


def _manifest(
    run: _Run,
    catalog: Catalog,
    segment: Any,
    head: Any,
    runtime: dict[str, Any],
    model: BlobRef | None,
    base: Base | None,
) -> Manifest:
    assert run.encoder is not None and run.outcome is not None
    live = catalog.items[catalog.items >= 0]
    return Manifest(
        endpoint=run.spec.name,
        version=run.version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        lineage=run.version,
        base=base.version if base else None,
        encoder={**_describe(run), "handle": run.spec.encoder.source},
        runtime=runtime,
        dim=int(catalog.vectors.shape[1]),
        **steps.index_manifest(run.spec),
        count=int(len(np.unique(live))),
        rows=catalog.count,
        next_id=catalog.next_id,
        labels=steps.label_counts(_first_rows(catalog)),
        segments=(segment,),
        encoder_model=model,
        head=head,
        fine_tune=run.fine_tune,
        evaluation=run.outcome.evaluation,
        change={
            "kind": "train",
            "embedded": run.embedded.embedded,
            "reused": catalog.count + run.dropped - run.embedded.embedded,
        },
        source_zip=run.zip_name,
    )


def _describe(run: _Run) -> dict[str, Any]:
    assert run.encoder is not None
    return dict(run.gathered.describe) if run.gathered is not None else run.encoder.describe()


def _first_rows(catalog: Catalog) -> list[dict[str, Any]]:
    """One entry per item (an item's label counts once, whatever its number of photos)."""
    _, first = np.unique(catalog.items, return_index=True)
    return [catalog.entries[int(r)] for r in sorted(first)]


def _rebase(run: _Run, catalog: Catalog, before: Base, after: Base) -> Catalog:
    """This train's rows with the changes published since `before` applied: deletes and edits where
    the item is still there, adds kept unless the train's zip names the same item."""
    changes = diff(before.view, after.view)
    keep = np.array([int(i) not in changes.deleted for i in catalog.items], dtype=bool)
    catalog = catalog.take(np.flatnonzero(keep))
    for r in range(catalog.count):
        edit = changes.edited.get(int(catalog.items[r]))
        if edit is not None:
            catalog.entries[r] = {**catalog.entries[r], **edit}
    names = {catalog.item_name(r) for r in range(catalog.count)}
    head = run.outcome.head if run.outcome else None
    for found in changes.added.values():
        segment = after.view.segments[found.segment]
        rows = to_catalog(segment, found.rows, after.manifest.head is not None, catalog.next_id)
        if rows.item_name(0) in names:
            continue  # the zip names this item: the train's image replaces the change's
        rows.vectors = head.embed(rows.backbone, rows.thumbs) if head is not None else rows.backbone
        catalog = catalog.extend(rows)
    catalog.next_id = max(catalog.next_id, after.manifest.next_id)
    return catalog


def _counts(run: _Run, manifest: Manifest) -> dict[str, Any]:
    assert run.plan is not None
    return {
        "files": len(run.plan.entries) + len(run.plan.skipped),
        "images": manifest.rows,
        "embedded": run.embedded.embedded,
        "reused": manifest.rows + run.dropped - run.embedded.embedded,
        "skipped": len(_skipped(run)),
        "labels": dict(manifest.labels),
        "metadata_file": run.plan.metadata_file,
        "metadata_matched": len(run.plan.metadata),
        "metadata_unmatched": run.plan.metadata_unmatched,
        **({"duplicates": run.duplicates} if run.duplicates is not None else {}),
    }
