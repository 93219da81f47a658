"""A full train: every image of a zip becomes the catalog of a new version (plan, embed, merge,
fine-tune, stage, publish). Images a published version holds already are not embedded again."""

from __future__ import annotations

import zipfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.catalog import images, ingest, rows
from service.catalog.rows import Catalog, VectorCache
from service.core.config import Settings
from service.core.endpoint import EndpointSpec
from service.core.errors import TrainingError
from service.encoders import convert
from service.storage import Storage, versions
from service.training import embedding, finetune, merge, steps
from service.training.results import Progress, ProgressFn, TrainResult, quiet


def train(
    spec: EndpointSpec,
    zip_path: Path,
    storage: Storage,
    settings: Settings,
    on_progress: ProgressFn | None = None,
    version: str | None = None,
    fine_tune: str = "auto",
) -> TrainResult:
    """Embed every image in the zip, fine-tune a head if the labels allow, index, and publish."""
    report = on_progress or quiet
    version = version or versions.new_version_id()
    report(Progress("ingest", 0, 0))
    with steps.work_folder(settings, spec.name) as tmp, ingest.open_zip(zip_path) as zf:
        staging = Path(tmp)
        plan = steps.plan_zip(zf, settings)
        encoder = steps.converted_encoder(steps.load_encoder(spec, settings, storage), settings, report)
        wants_head = finetune.plan(fine_tune, [e.label for e in plan.entries], spec.head)
        embedded, base = _embed(zf, plan, staging, encoder, spec, settings, storage, wants_head, report)
        catalog = merge.to_rows(
            embedded, plan, base, 3 * spec.head.thumbnail**2, merge.reserver(storage, spec.name)
        )
        outcome = _fine_tune(fine_tune, wants_head, catalog, spec, report)
        runtime = _stage(catalog, outcome, encoder, staging, spec, settings, report)
        counts = _counts(plan, catalog, embedded)
        manifest = _manifest(spec, encoder, runtime, outcome, fine_tune, catalog, counts, zip_path, version)
        manifest = _publish(storage, spec.name, version, staging, manifest, report)
    steps.published(storage, settings, spec.name, version)
    skipped = [*plan.skipped, *embedded.skipped]
    return TrainResult(version, catalog.count, counts, skipped, manifest, outcome.evaluation, runtime)


def _embed(
    zf: zipfile.ZipFile,
    plan: ingest.ZipPlan,
    staging: Path,
    encoder: convert.Verified,
    spec: EndpointSpec,
    settings: Settings,
    storage: Storage,
    wants_head: bool,
    report: ProgressFn,
) -> tuple[embedding.Embedded, Catalog | None]:
    """Embed the zip's images, reusing the current version's vectors (same encoder, same bytes);
    also the current version's rows, whose item ids the train keeps for names it finds again."""
    thumb_dim = 3 * spec.head.thumbnail**2
    base, reusable = rows.current_catalog(storage, spec.name, encoder.fingerprint, thumb_dim)
    head_config = spec.head if wants_head else None
    embedded = embedding.embed(
        zf,
        plan,
        staging,
        encoder,
        settings,
        head_config,
        spec.head.thumbnail,
        report,
        VectorCache.of(reusable),
    )
    if not embedded.accepted:
        skipped = [*plan.skipped, *embedded.skipped]
        raise TrainingError(
            f"the zip holds no usable image ({len(skipped)} files skipped; "
            f"images must be {images.SUPPORTED})",
            skipped,
        )
    return embedded, base


def _fine_tune(
    mode: str, wanted: bool, catalog: Catalog, spec: EndpointSpec, report: ProgressFn
) -> finetune.Outcome:
    """A head, when the mode and the zip's labels call for one (its vectors replace the
    backbone's); finetune.fine_tune decides on the images that decoded."""
    if not wanted:
        return finetune.not_trained(mode, spec.head)
    outcome = steps.fine_tune(mode, catalog, spec.head, report)
    if outcome.head is not None:
        catalog.vectors = outcome.head.embed(catalog.backbone, catalog.thumbs)
    return outcome


def _stage(
    catalog: Catalog,
    outcome: finetune.Outcome,
    encoder: convert.Verified,
    staging: Path,
    spec: EndpointSpec,
    settings: Settings,
    report: ProgressFn,
) -> dict[str, Any]:
    """The version's files in `staging`: rows, index, head, converted encoder; its runtime entry."""
    steps.stage_rows(catalog, outcome.head, staging, spec.n_trees, report)
    if outcome.head is not None:
        outcome.head.save(staging)
    return steps.stage_converted(encoder, staging, settings, staging / "images")


def _counts(plan: ingest.ZipPlan, catalog: Catalog, embedded: embedding.Embedded) -> dict[str, Any]:
    labels = Counter(e["label"] for e in catalog.entries if e["label"] is not None)
    skipped = len(plan.skipped) + len(embedded.skipped)
    return {
        "files": len(plan.entries) + len(plan.skipped),
        "images": catalog.count,
        "embedded": embedded.embedded,
        "reused": catalog.count - embedded.embedded,
        "skipped": skipped,
        "labels": dict(sorted(labels.items())),
        "metadata_file": plan.metadata_file,
        "metadata_matched": len(plan.metadata),
        "metadata_unmatched": plan.metadata_unmatched,
    }


def _manifest(
    spec: EndpointSpec,
    encoder: convert.Verified,
    runtime: dict[str, Any],
    outcome: finetune.Outcome,
    fine_tune: str,
    catalog: Catalog,
    counts: dict[str, Any],
    zip_path: Path,
    version: str,
) -> dict[str, Any]:
    return {
        "encoder": {**encoder.describe(), "handle": spec.encoder.source},
        "runtime": runtime,
        "head": steps.head_manifest(outcome.head),
        "fine_tune": fine_tune,
        "evaluation": outcome.evaluation,
        **steps.index_manifest(spec, int(catalog.vectors.shape[1])),
        **rows.manifest_summary(catalog),
        "labels": counts["labels"],
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source_zip": zip_path.name,
        "change": {"kind": "train", "embedded": counts["embedded"], "reused": counts["reused"]},
        "lineage": version,
    }


def _publish(
    storage: Storage, endpoint: str, version: str, staging: Path, manifest: dict[str, Any], report: ProgressFn
) -> dict[str, Any]:
    """Upload the staged version and make it current ("the newest upload wins", versions.publish)."""
    report(Progress("publish", 0, 1))
    try:
        published = versions.publish(storage, endpoint, version, staging, manifest)
    except Exception:
        steps.discard(storage, endpoint, version)
        raise
    report(Progress("publish", 1, 1))
    return published
