"""The pipeline's shared steps: find the encoder, plan the zip, fine-tune, stage a version's files,
publish it; and the scratch folder a job works in."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from service import encoders
from service.catalog import images, ingest, rows
from service.catalog.head import HEAD_FILES, Head
from service.catalog.rows import Catalog
from service.core.config import Settings
from service.core.endpoint import EndpointSpec, HeadConfig
from service.core.errors import BadImageError
from service.encoders import convert, litert
from service.storage import Storage, encoder_mirror, versions
from service.training import finetune
from service.training.embedding import mirror_thumbs
from service.training.results import Progress, ProgressFn

log = logging.getLogger(__name__)


def work_folder(settings: Settings, endpoint: str, kind: str = "train") -> tempfile.TemporaryDirectory[str]:
    """A scratch folder under the cache, named for its owner's pid (leftovers of dead jobs are removed)."""
    work_root = settings.cache_dir / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=work_root, prefix=f"{os.getpid()}-{endpoint}-{kind}-")


def plan_zip(zf: zipfile.ZipFile, settings: Settings) -> ingest.ZipPlan:
    """Which entries are images, their labels and metadata; a bad zip fails here, before any encoder."""
    return ingest.plan(zf, ingest.ZipLimits.from_settings(settings))


def load_encoder(spec: EndpointSpec, settings: Settings, storage: Storage) -> encoders.Encoder:
    """The endpoint's encoder, found the way this instance finds encoders (hub, mirror, offline)."""
    source = encoders.resolve(spec.encoder, settings.encoder_mode, settings.models_dir)
    return encoders.load(source, settings.hub_cache, encoder_mirror(settings, storage))


def converted_encoder(encoder: encoders.Encoder, settings: Settings, report: ProgressFn) -> convert.Verified:
    """The encoder a job embeds with: converted for LiteRT and checked, or TensorFlow and why."""
    report(Progress("convert", 0, 1))
    verified = convert.prepare(
        encoder, settings.cache_dir, settings.encoder_runtime, settings.converted_min_cosine
    )
    report(Progress("convert", 1, 1))
    return verified


def fine_tune(mode: str, catalog: Catalog, config: HeadConfig, report: ProgressFn) -> finetune.Outcome:
    """Train a head on the catalog's stored backbone vectors (and mirrored copies when kept)."""
    report(Progress("fine-tune", 0, 1))
    outcome = finetune.fine_tune(
        mode,
        catalog.backbone,
        catalog.thumbs,
        [e["label"] for e in catalog.entries],
        config,
        catalog.mirrored,
        None if catalog.mirrored is None else mirror_thumbs(catalog.thumbs, config.thumbnail),
    )
    report(Progress("fine-tune", 1, 1))
    return outcome


def stage_rows(catalog: Catalog, head: Head | None, staging: Path, n_trees: int, report: ProgressFn) -> None:
    """Write the version's row files and a new index over `catalog.vectors` into `staging`."""
    report(Progress("index", 0, catalog.count))
    rows.write(catalog, staging, n_trees, head=head is not None)


def stage_converted(
    encoder: convert.Verified, staging: Path, settings: Settings, job_images: Path
) -> dict[str, Any]:
    """Put the converted model (if it passed every check) with the version; its `runtime` entry.

    A job whose images were all reused from the catalog embedded nothing, so nothing was checked
    yet: the job's own images (`job_images`, their originals) are checked here."""
    if encoder.converted is not None and encoder.checked < convert.CHECK_IMAGES:
        inputs = []
        for path in sorted(p for p in job_images.glob("*") if p.is_file())[: convert.CHECK_IMAGES]:
            try:
                inputs.append(
                    images.prepare(path.read_bytes(), encoder.input_size, settings.max_image_pixels)[0]
                )
            except BadImageError:
                continue
        if inputs:
            encoder.check(np.stack(inputs))
    model = convert.model_path(encoder, settings.cache_dir)
    if model is not None:
        # A copy, not a link: the instance's cache file must never be the published one.
        shutil.copyfile(model, staging / litert.MODEL_FILE)
    return encoder.runtime


def head_manifest(head: Head | None) -> dict[str, Any] | None:
    if head is None:
        return None
    return {
        "files": list(HEAD_FILES),
        "fingerprint": head.fingerprint,
        "feature_dim": head.dim,
        "labels": head.definition["labels"],
        "thumbnail": head.thumbnail,
    }


def index_manifest(spec: EndpointSpec, dim: int) -> dict[str, Any]:
    """The manifest's description of how the version's index was built."""
    return {"dim": dim, "metric": spec.metric, "n_trees": spec.n_trees, "search_k": spec.search_k}


def discard(storage: Storage, endpoint: str, version: str) -> None:
    """Best effort: remove the files of a version whose publish failed (unless it became current)."""
    try:
        if versions.read_current(storage, endpoint).version != version:
            storage.delete_prefix(versions.version_prefix(endpoint, version))
    except Exception as exc:  # the store may be what failed; prune_versions cleans up later
        log.warning("could not remove the unpublished version %s of %s: %s", version, endpoint, exc)


def prune(storage: Storage, endpoint: str, keep: int) -> None:
    """Best effort: the new version is live; a failure to delete old ones must not fail the job."""
    try:
        versions.prune_versions(storage, endpoint, keep)
    except Exception as exc:
        log.warning("could not delete old versions of %s: %s", endpoint, exc)


def published(storage: Storage, settings: Settings, endpoint: str, version: str) -> None:
    """After CURRENT names `version`: tell this instance's workers, then drop old versions."""
    versions.note_published(settings.cache_dir, endpoint, version)
    prune(storage, endpoint, settings.keep_versions)
