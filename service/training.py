"""Training: zip of images in, a published version out (embed, fine-tune, index, publish).

Decoding and resizing run in a thread pool ahead of the encoder (PIL releases the GIL), so the
forward pass rarely waits for images.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import zipfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import encoders, finetune, images, ingest, jsonmap, versions
from .config import Settings
from .endpoint import EndpointSpec
from .errors import BadImageError, TrainingError
from .head import HEAD_FILES, Head, HeadConfig, thumbnails
from .index import build_index
from .storage import Storage, encoder_mirror

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    stage: str  # "ingest", "embed", "fine-tune", "index", "publish"
    done: int
    total: int


@dataclass
class TrainResult:
    version: str
    count: int
    counts: dict[str, Any]
    skipped: list[ingest.Skipped] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)  # hold-out metrics when fine-tuned


ProgressFn = Callable[[Progress], None]


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
    report = on_progress or (lambda p: None)
    version = version or versions.new_version_id()
    report(Progress("ingest", 0, 0))
    source = encoders.resolve(spec.encoder, settings.encoder_mode, settings.models_dir)
    encoder = encoders.load(source, settings.hub_cache, encoder_mirror(settings, storage))

    work_root = settings.cache_dir / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=work_root, prefix=f"{os.getpid()}-{spec.name}-") as tmp,
        ingest.open_zip(zip_path) as zf,
    ):
        staging = Path(tmp)
        plan = ingest.plan(zf, ingest.ZipLimits.from_settings(settings))
        wants_head = finetune.plan(fine_tune, [e.label for e in plan.entries], spec.head)
        embedded = _embed(zf, plan, staging, encoder, settings, spec.head if wants_head else None, report)
        skipped = [*plan.skipped, *embedded.skipped]
        if not embedded.accepted:
            raise TrainingError(
                f"the zip holds no usable image ({len(skipped)} files skipped; images must be "
                f"{images.SUPPORTED})",
                skipped,
            )
        labels_of = [e.label for e, _ in embedded.accepted]
        backbone = np.concatenate(embedded.vectors)
        outcome = finetune.not_trained(fine_tune, spec.head)
        if wants_head:
            report(Progress("fine-tune", 0, 1))
            thumbs = np.concatenate(embedded.thumbs)
            mirrored = np.concatenate(embedded.mirrored) if embedded.mirrored else None
            mirrored_thumbs = np.concatenate(embedded.mirrored_thumbs) if embedded.mirrored else None
            outcome = finetune.fine_tune(
                fine_tune, backbone, thumbs, labels_of, spec.head, mirrored, mirrored_thumbs
            )
            report(Progress("fine-tune", 1, 1))
        vectors = backbone if outcome.head is None else outcome.head.embed(backbone, thumbs)

        report(Progress("index", 0, len(vectors)))
        np.save(staging / "vectors.npy", vectors.astype(np.float32), allow_pickle=False)
        build_index(vectors, spec.n_trees, staging / "index.ann")
        if outcome.head is not None:
            outcome.head.save(staging)
        labels = Counter(label for label in labels_of if label is not None)
        jsonmap.write(staging / "ids.json", (e.name for e, _ in embedded.accepted))
        jsonmap.write(
            staging / "metadata.json",
            (
                {"label": e.label, "metadata": plan.metadata.get(e.name, {}), "image": key}
                for e, key in embedded.accepted
            ),
        )
        counts = {
            "files": len(plan.entries) + len(plan.skipped),
            "images": len(embedded.accepted),
            "skipped": len(skipped),
            "labels": dict(sorted(labels.items())),
            "metadata_file": plan.metadata_file,
            "metadata_matched": len(plan.metadata),
            "metadata_unmatched": plan.metadata_unmatched,
        }
        manifest = {
            "encoder": {**encoder.describe(), "handle": spec.encoder.source},
            "head": _head_manifest(outcome.head),
            "fine_tune": fine_tune,
            "evaluation": outcome.evaluation,
            "dim": int(vectors.shape[1]),
            "metric": spec.metric,
            "n_trees": spec.n_trees,
            "search_k": spec.search_k,
            "count": len(vectors),
            "labels": counts["labels"],
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "source_zip": zip_path.name,
        }

        report(Progress("publish", 0, 1))
        try:
            manifest = versions.publish(storage, spec.name, version, staging, manifest)
        except Exception:
            _discard(storage, spec.name, version)
            raise
        report(Progress("publish", 1, 1))
    _prune(storage, spec.name, settings.keep_versions)
    return TrainResult(version, len(vectors), counts, skipped, manifest, outcome.evaluation)


def _head_manifest(head: Head | None) -> dict[str, Any] | None:
    if head is None:
        return None
    return {
        "files": list(HEAD_FILES),
        "fingerprint": head.fingerprint,
        "feature_dim": head.dim,
        "labels": head.definition["labels"],
        "thumbnail": head.thumbnail,
    }


@dataclass
class _Embedded:
    """The accepted images and their encoder outputs, in id order."""

    accepted: list[tuple[ingest.Entry, str]] = field(default_factory=list)  # (entry, image key)
    skipped: list[ingest.Skipped] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    thumbs: list[np.ndarray] = field(default_factory=list)
    mirrored: list[np.ndarray] = field(default_factory=list)
    mirrored_thumbs: list[np.ndarray] = field(default_factory=list)


def _embed(
    zf: zipfile.ZipFile,
    plan: ingest.ZipPlan,
    staging: Path,
    encoder: encoders.Encoder,
    settings: Settings,
    head: HeadConfig | None,
    report: ProgressFn,
) -> _Embedded:
    """Decode and embed every candidate image; keep the originals in `staging`.

    Three stages overlap: this thread reads the zip and writes originals, a thread pool decodes
    and resizes (PIL releases the GIL), and an encoder thread runs the forward passes on full
    batches. With a head to train it also keeps thumbnails and, when augmenting, the backbone
    vectors of the mirrored images (one more forward pass per batch).
    """
    out = _Embedded()
    total, done = len(plan.entries), 0
    size, batch_size = encoder.input_size, settings.encode_batch_size
    (staging / "images").mkdir()
    batches: queue.Queue[tuple[np.ndarray, int] | None] = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def encode_batches() -> None:
        while (item := batches.get()) is not None:
            inputs, done_so_far = item
            if failure:
                continue  # drain the queue so the producer never blocks
            try:
                out.vectors.append(encoder.encode(inputs))
                if head is not None:
                    out.thumbs.append(thumbnails(inputs, head.thumbnail))
                    if head.augment:
                        flipped = np.ascontiguousarray(inputs[:, :, ::-1])
                        out.mirrored.append(encoder.encode(flipped))
                        out.mirrored_thumbs.append(thumbnails(flipped, head.thumbnail))
                report(Progress("embed", done_so_far, total))
            except BaseException as exc:
                failure.append(exc)

    consumer = threading.Thread(target=encode_batches, name="encode", daemon=True)
    consumer.start()
    report(Progress("embed", 0, total))
    batch = np.empty((batch_size, size, size, 3), np.uint8)
    filled = 0
    try:
        with ThreadPoolExecutor(max(1, settings.decode_threads), "decode") as pool:
            for entry, data, prepared in _decoded(zf, plan.entries, pool, size, settings):
                done += 1
                if failure:
                    break
                if isinstance(prepared, str):
                    out.skipped.append(ingest.Skipped(entry.name, prepared))
                    continue
                array, fmt = prepared
                image_key = f"images/{len(out.accepted)}{images.FORMATS[fmt][0]}"
                (staging / image_key).write_bytes(data)
                out.accepted.append((entry, image_key))
                batch[filled] = array
                filled += 1
                if filled == batch_size:
                    batches.put((batch, done))
                    batch, filled = np.empty_like(batch), 0
        if filled:
            batches.put((batch[:filled], done))
    finally:
        batches.put(None)
        consumer.join()
    if failure:
        raise failure[0]
    report(Progress("embed", done, total))
    return out


def _discard(storage: Storage, endpoint: str, version: str) -> None:
    """Best effort: remove the files of a version whose publish failed (unless it became current)."""
    try:
        if versions.read_current(storage, endpoint).version != version:
            storage.delete_prefix(versions.version_prefix(endpoint, version))
    except Exception as exc:  # the store may be what failed; prune_versions cleans up later
        log.warning("could not remove the unpublished version %s of %s: %s", version, endpoint, exc)


def _prune(storage: Storage, endpoint: str, keep: int) -> None:
    """Best effort: the new version is live; a failure to delete old ones must not fail the job."""
    try:
        versions.prune_versions(storage, endpoint, keep)
    except Exception as exc:
        log.warning("could not delete old versions of %s: %s", endpoint, exc)


Prepared = tuple[np.ndarray, str] | str  # (input array, format) or the reason it was skipped


def _decoded(
    zf: zipfile.ZipFile, entries: list[ingest.Entry], pool: ThreadPoolExecutor, size: int, settings: Settings
) -> Iterator[tuple[ingest.Entry, bytes, Prepared]]:
    """Yield each entry with its bytes and decoded input, decoding a window ahead in `pool`."""
    window = max(2 * settings.encode_batch_size, 4)
    pending: deque[tuple[ingest.Entry, bytes, Future[tuple[np.ndarray, str]] | str]] = deque()

    def settle(
        item: tuple[ingest.Entry, bytes, Future[tuple[np.ndarray, str]] | str],
    ) -> tuple[ingest.Entry, bytes, Prepared]:
        entry, data, job = item
        if isinstance(job, str):
            return entry, data, job
        try:
            return entry, data, job.result()
        except BadImageError as exc:
            return entry, data, exc.message

    for entry in entries:
        # Zip reads stay on this thread (one file handle); only decoding is parallel.
        try:
            data = ingest.read_entry(zf, entry)
            pending.append(
                (
                    entry,
                    data,
                    pool.submit(
                        images.prepare, data, size, settings.max_image_pixels, settings.allowed_formats
                    ),
                )
            )
        except TrainingError as exc:
            pending.append((entry, b"", exc.message))
        if len(pending) >= window:
            yield settle(pending.popleft())
    while pending:
        yield settle(pending.popleft())
