"""The pipeline's shared steps: find the encoder, plan the zip, fine-tune, stage the converted
encoder, publish and what follows it; and the scratch folder a job works in."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from service import encoders
from service.catalog import images, ingest
from service.catalog.head import Head
from service.catalog.rows import Catalog
from service.core.config import Settings
from service.core.endpoint import EndpointSpec, HeadConfig
from service.core.errors import BadImageError, ConflictError, IntegrityError
from service.encoders import convert
from service.storage import Storage, encoder_mirror, gc, versions
from service.storage.blobs import BlobCache
from service.storage.manifest import BlobRef, Manifest
from service.training import finetune, fuse
from service.training.embedding import mirror_thumbs
from service.training.results import Progress, ProgressFn
from service.training.stage import Stager

log = logging.getLogger(__name__)


def work_folder(settings: Settings, endpoint: str, kind: str = "train") -> tempfile.TemporaryDirectory[str]:
    """A scratch folder under the cache, named for its owner's pid (leftovers of dead jobs are removed)."""
    work_root = settings.cache_dir / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=work_root, prefix=f"{os.getpid()}-{endpoint}-{kind}-")


def blob_cache(storage: Storage, settings: Settings) -> BlobCache:
    """This instance's blob cache (shared with its web workers)."""
    return BlobCache(storage, settings.cache_dir)


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


def stage_converted(
    encoder: convert.Verified, stager: Stager, settings: Settings, job_images: Iterable[Path]
) -> tuple[dict[str, Any], BlobRef | None]:
    """The converted model (if it passed every check) as a file of the version; its `runtime` entry.

    A job whose images were all reused from the cache embedded nothing, so nothing was checked yet:
    its own images (`job_images`, their originals) are checked here."""
    if encoder.converted is not None and encoder.checked < convert.CHECK_IMAGES:
        check_converted(
            encoder, (p.read_bytes() for p in sorted(job_images)[: convert.CHECK_IMAGES]), settings
        )
    model = convert.model_path(encoder, settings.cache_dir)
    if model is None:
        return encoder.runtime, None
    # A copy, not the cache's file: a local store links what it publishes, and the instance's
    # cache file must never be the published one.
    copy = stager.folder / "encoder.tflite"
    shutil.copyfile(model, copy)
    return encoder.runtime, stager.file(copy)


def check_converted(encoder: convert.Verified, originals: Iterable[bytes], settings: Settings) -> None:
    """Check the converted model against TensorFlow on the first CHECK_IMAGES of `originals` (a
    job's images) that decode; one that disagrees switches the job to TensorFlow."""
    inputs = _first_inputs(originals, encoder.input_size, settings)
    if len(inputs):
        encoder.check(inputs)


def fuse_head(
    encoder: convert.Verified, head: Head, settings: Settings, folder: Path, job_images: Iterable[Path]
) -> tuple[Path | None, dict[str, Any]]:
    """The head fused with the converted backbone (training/fuse.py), checked on sample inputs and
    the job's first images; None and why when it is not (FUSE_HEAD=0, TensorFlow serving, ...)."""
    if not settings.fuse_head:
        return None, {"fused": False, "reason": "FUSE_HEAD=0"}
    checks = _first_inputs((p.read_bytes() for p in sorted(job_images)), encoder.input_size, settings)
    folder.mkdir(parents=True, exist_ok=True)
    return fuse.fuse(encoder, head, checks, folder, settings.converted_min_cosine)


def _first_inputs(originals: Iterable[bytes], size: int, settings: Settings) -> np.ndarray:
    """Encoder inputs of the first CHECK_IMAGES of `originals` that decode (the rest unread)."""
    inputs: list[np.ndarray] = []
    limits = (settings.max_image_pixels, settings.allowed_formats)
    for data in originals:
        if len(inputs) == convert.CHECK_IMAGES:
            break
        try:
            inputs.append(images.prepare(data, size, *limits)[0])
        except BadImageError:
            continue
    return np.stack(inputs) if inputs else np.zeros((0, size, size, 3), np.uint8)


def index_manifest(spec: EndpointSpec) -> dict[str, Any]:
    """How the version's index is built: the manifest's metric, n_trees, search_k."""
    return {"metric": spec.metric, "n_trees": spec.n_trees, "search_k": spec.search_k}


def label_counts(entries: Iterable[dict[str, Any]]) -> dict[str, int]:
    labels = Counter(e["label"] for e in entries if e.get("label") is not None)
    return dict(sorted(labels.items()))


def published(storage: Storage, settings: Settings, endpoint: str, version: str) -> None:
    """After CURRENT names `version`: tell this instance's workers, drop the versions past
    KEEP_VERSIONS and the files only they held (best effort: the version is live already)."""
    versions.note_published(settings.cache_dir, endpoint, version)
    try:
        pruned = versions.prune_versions(storage, endpoint, settings.keep_versions)
        gc.collect_pruned(storage, endpoint, pruned)
    except Exception as exc:
        log.warning("could not delete old versions of %s: %s", endpoint, exc)


def verify_carried(endpoint: str, manifest: Manifest, cache: BlobCache, everything: bool = False) -> None:
    """The files of `manifest` a version is served with match their sha256, or a 409 naming the
    first that does not. A change checks the model files it carries (the converted encoder, the
    head: small, and what a damaged cache copy would break everywhere) among those this instance
    holds; a rollback (`everything`) fetches and checks every file. Segment files are checked by
    each instance that serves them."""
    refs = list(manifest.blobs()) if everything else [*_model_files(manifest)]
    for ref in refs:
        try:
            if everything:
                cache.path(endpoint, ref, "a file of the version")
            else:
                cache.held(endpoint, ref, "a file of the version")
        except IntegrityError as exc:
            raise ConflictError(
                f"{endpoint} version {manifest.version} is damaged: {exc.message}; nothing was changed"
            ) from None


def _model_files(manifest: Manifest) -> list[BlobRef]:
    files = [manifest.encoder_model] if manifest.encoder_model is not None else []
    return files + (list(manifest.head.files.values()) if manifest.head is not None else [])
