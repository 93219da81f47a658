"""Training: zip of images in, a published version out (embed, fine-tune, index, publish).

Decoding and resizing run in a thread pool ahead of the encoder (PIL releases the GIL), so the
forward pass rarely waits for images.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import zipfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from service import encoders
from service.catalog import catalogue, finetune, images, ingest
from service.catalog.catalogue import Catalogue, VectorCache
from service.catalog.head import HEAD_FILES, Head, thumbnails
from service.core.config import Settings
from service.core.endpoint import EndpointSpec, HeadConfig
from service.core.errors import BadImageError, TrainingError
from service.encoders import convert, litert
from service.storage import Storage, encoder_mirror, versions

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
    runtime: dict[str, Any] = field(default_factory=dict)  # which runtime serves it, and why


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
    with work_folder(settings, spec.name) as tmp, ingest.open_zip(zip_path) as zf:
        staging = Path(tmp)
        plan = ingest.plan(
            zf, ingest.ZipLimits.from_settings(settings)
        )  # a bad zip fails before the encoder loads
        encoder = converted_encoder(load_encoder(spec, settings, storage), settings, report)
        wants_head = finetune.plan(fine_tune, [e.label for e in plan.entries], spec.head)
        thumb_dim = 3 * spec.head.thumbnail**2
        base, reusable = catalogue.current_catalogue(storage, spec.name, encoder.fingerprint, thumb_dim)
        cache = VectorCache.of(reusable)
        head_config = spec.head if wants_head else None
        embedded = embed(
            zf, plan, staging, encoder, settings, head_config, spec.head.thumbnail, report, cache
        )
        skipped = [*plan.skipped, *embedded.skipped]
        if not embedded.accepted:
            raise TrainingError(
                f"the zip holds no usable image ({len(skipped)} files skipped; images must be "
                f"{images.SUPPORTED})",
                skipped,
            )
        rows = rows_of(embedded, plan, base, thumb_dim, reserver(storage, spec.name))
        outcome = finetune.not_trained(fine_tune, spec.head)
        if wants_head:
            report(Progress("fine-tune", 0, 1))
            outcome = finetune.fine_tune(
                fine_tune,
                rows.backbone,
                rows.thumbs,
                [e["label"] for e in rows.entries],
                spec.head,
                rows.mirrored,
                None if rows.mirrored is None else mirror_thumbs(rows.thumbs, spec.head.thumbnail),
            )
            report(Progress("fine-tune", 1, 1))
        if outcome.head is not None:
            rows.vectors = outcome.head.embed(rows.backbone, rows.thumbs)

        report(Progress("index", 0, rows.count))
        catalogue.write(rows, staging, spec.n_trees, head=outcome.head is not None)
        if outcome.head is not None:
            outcome.head.save(staging)
        runtime = stage_converted(encoder, staging, settings, staging / "images")
        labels = Counter(e["label"] for e in rows.entries if e["label"] is not None)
        counts = {
            "files": len(plan.entries) + len(plan.skipped),
            "images": rows.count,
            "embedded": embedded.embedded,
            "reused": rows.count - embedded.embedded,
            "skipped": len(skipped),
            "labels": dict(sorted(labels.items())),
            "metadata_file": plan.metadata_file,
            "metadata_matched": len(plan.metadata),
            "metadata_unmatched": plan.metadata_unmatched,
        }
        manifest = {
            "encoder": {**encoder.describe(), "handle": spec.encoder.source},
            "runtime": runtime,
            "head": head_manifest(outcome.head),
            "fine_tune": fine_tune,
            "evaluation": outcome.evaluation,
            "dim": int(rows.vectors.shape[1]),
            "metric": spec.metric,
            "n_trees": spec.n_trees,
            "search_k": spec.search_k,
            **catalogue.manifest_summary(rows),
            "labels": counts["labels"],
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "source_zip": zip_path.name,
            "change": {"kind": "train", "embedded": counts["embedded"], "reused": counts["reused"]},
            "lineage": version,
        }

        report(Progress("publish", 0, 1))
        try:
            manifest = versions.publish(storage, spec.name, version, staging, manifest)
        except Exception:
            discard(storage, spec.name, version)
            raise
        report(Progress("publish", 1, 1))
    versions.note_published(settings.cache_dir, spec.name, version)
    prune(storage, spec.name, settings.keep_versions)
    return TrainResult(version, rows.count, counts, skipped, manifest, outcome.evaluation, runtime)


def reserver(storage: Storage, endpoint: str) -> Callable[[int, int], int]:
    """New item ids, `reserve(count, floor)`, from the endpoint's only-growing counter."""
    return lambda count, floor: versions.reserve_ids(storage, endpoint, count, floor)


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


def stage_converted(
    encoder: convert.Verified, staging: Path, settings: Settings, job_images: Path
) -> dict[str, Any]:
    """Put the converted model (if it passed every check) with the version; its `runtime` entry.

    A job whose images were all reused from the catalogue embedded nothing, so nothing was
    checked yet: the job's own images (`job_images`, their originals) are checked here."""
    if encoder.converted is not None and encoder.checked < convert.CHECK_IMAGES:
        sample = sorted(p for p in job_images.glob("*") if p.is_file())[: convert.CHECK_IMAGES]
        inputs = []
        for path in sample:
            try:
                inputs.append(
                    images.prepare(path.read_bytes(), encoder.input_size, settings.max_image_pixels)[0]
                )
            except BadImageError:
                continue
        if inputs:
            encoder.check(np.stack(inputs))
    path = convert.model_path(encoder, settings.cache_dir)
    if path is not None:
        # A copy, not a link: the instance's cache file must never be the published one.
        shutil.copyfile(path, staging / litert.MODEL_FILE)
    return encoder.runtime


def work_folder(settings: Settings, endpoint: str, kind: str = "train") -> tempfile.TemporaryDirectory[str]:
    """A scratch folder under the cache, named for its owner's pid (leftovers of dead jobs are removed)."""
    work_root = settings.cache_dir / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=work_root, prefix=f"{os.getpid()}-{endpoint}-{kind}-")


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


@dataclass
class _Accepted:
    entry: ingest.Entry
    image: str  # the image's key in the version: images/<sha256><ext>
    sha256: str
    cached: int | None  # its row in the cache's catalogue, or None: embedded now


@dataclass
class _Embedded:
    """The accepted images in id order; the encoder outputs of those embedded now, in order."""

    accepted: list[_Accepted] = field(default_factory=list)
    skipped: list[ingest.Skipped] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    thumbs: list[np.ndarray] = field(default_factory=list)
    mirrored: list[np.ndarray] = field(default_factory=list)
    cache: VectorCache = field(default_factory=VectorCache)

    @property
    def embedded(self) -> int:
        return sum(len(v) for v in self.vectors)


def mirror_thumbs(thumbs: np.ndarray, side: int) -> np.ndarray:
    """Thumbnails of the mirrored images: the thumbnails mirrored (box filtering commutes with it)."""
    if side <= 0 or thumbs.shape[1] == 0:
        return thumbs
    return thumbs.reshape(len(thumbs), side, side, 3)[:, :, ::-1].reshape(len(thumbs), -1)


def rows_of(
    embedded: _Embedded,
    plan: ingest.ZipPlan,
    base: Catalogue | None,
    thumb_dim: int,
    reserve: Callable[[int, int], int],
) -> Catalogue:
    """The accepted images as catalogue rows: cached vectors where the cache had them, item ids kept
    for names the current version (`base`) holds, new ids for the others from `reserve(count,
    floor)`, the endpoint's only-growing id counter (versions.reserve_ids)."""
    n = len(embedded.accepted)
    fresh = [a for a in embedded.accepted if a.cached is None]
    cached_rows = embedded.cache.catalogue
    dim = (embedded.vectors[0] if embedded.vectors else cached_rows.backbone).shape[1]  # type: ignore[union-attr]
    backbone = np.zeros((n, dim), np.float32)
    thumbs = np.zeros((n, thumb_dim), np.float32)
    with_mirror = bool(embedded.mirrored) or not fresh
    mirrored = np.zeros((n, dim), np.float32) if with_mirror else None
    new_rows = [i for i, a in enumerate(embedded.accepted) if a.cached is None]
    old_rows = [i for i, a in enumerate(embedded.accepted) if a.cached is not None]
    if new_rows:
        backbone[new_rows] = np.concatenate(embedded.vectors)
        if embedded.thumbs:
            thumbs[new_rows] = np.concatenate(embedded.thumbs)
        if mirrored is not None and embedded.mirrored:
            mirrored[new_rows] = np.concatenate(embedded.mirrored)
    if old_rows:
        cached = embedded.cache.catalogue
        assert cached is not None
        source = [embedded.accepted[i].cached for i in old_rows]
        backbone[old_rows] = cached.backbone[source]
        thumbs[old_rows] = cached.thumbs[source]
        if mirrored is not None:
            if cached.mirrored is None:
                mirrored = None  # not every row has one: the head trains without mirrored copies
            else:
                mirrored[old_rows] = cached.mirrored[source]
    known = base.item_ids_by_name() if base is not None else {}
    fields_of = [dict(plan.metadata.get(a.entry.name, {})) for a in embedded.accepted]
    # The metadata file's `item` column groups photos into one item; without it, the image is one.
    grouped = [f.pop("item", None) for f in fields_of]
    names = [
        str(g) if g not in (None, "") else a.entry.name
        for g, a in zip(grouped, embedded.accepted, strict=True)
    ]
    new_names = list(dict.fromkeys(name for name in names if name not in known))
    start = reserve(len(new_names), base.next_id if base is not None else 0)
    known.update({name: start + i for i, name in enumerate(new_names)})
    next_id = start + len(new_names)
    items = np.array([known[name] for name in names], dtype=np.int64)
    entries = []
    for accepted, fields, item_name in zip(embedded.accepted, fields_of, names, strict=True):
        entry = {
            "label": accepted.entry.label,
            "metadata": fields,
            "image": accepted.image,
            "sha256": accepted.sha256,
        }
        if item_name != accepted.entry.name:
            entry["item_name"] = item_name
        entries.append(entry)
    return Catalogue(
        items=items,
        names=[a.entry.name for a in embedded.accepted],
        entries=entries,
        vectors=backbone,
        backbone=backbone,
        thumbs=thumbs,
        mirrored=mirrored,
        next_id=next_id,
        image_sources=[None] * n,
    )


def embed(
    zf: zipfile.ZipFile,
    plan: ingest.ZipPlan,
    staging: Path,
    encoder: convert.Verified | encoders.Encoder,
    settings: Settings,
    head: HeadConfig | None,
    thumb_side: int,
    report: ProgressFn,
    cache: VectorCache | None = None,
) -> _Embedded:
    """Decode and embed every candidate image the cache does not hold; keep the originals in `staging`.

    Three stages overlap: this thread reads the zip and writes originals, a thread pool decodes
    and resizes (PIL releases the GIL), and an encoder thread runs the forward passes on full
    batches. With a head to train it also keeps thumbnails and, when augmenting, the backbone
    vectors of the mirrored images (one more forward pass per batch). An image whose bytes the
    cache holds (same sha256, same encoder) is neither decoded nor embedded again.
    """
    out = _Embedded(cache=cache or VectorCache())
    total, done = len(plan.entries), 0
    started = time.monotonic()
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
                # Thumbnails are kept with every version: a later change may train a head.
                out.thumbs.append(thumbnails(inputs, thumb_side))
                if head is not None and head.augment:
                    flipped = np.ascontiguousarray(inputs[:, :, ::-1])
                    out.mirrored.append(encoder.encode(flipped))
                report(Progress("embed", done_so_far, total))
            except BaseException as exc:
                failure.append(exc)

    consumer = threading.Thread(target=encode_batches, name="encode", daemon=True)
    consumer.start()
    report(Progress("embed", 0, total))
    batch = np.empty((batch_size, size, size, 3), np.uint8)
    filled = 0
    written: set[str] = set()
    try:
        with ThreadPoolExecutor(max(1, settings.decode_threads), "decode") as pool:
            deadline = started + settings.job_max_s
            for entry, data, digest, prepared in _decoded(zf, plan.entries, pool, size, settings, out.cache):
                done += 1
                if failure:
                    break
                if time.monotonic() > deadline:
                    raise TrainingError(
                        f"the job ran over its time limit (JOB_MAX_S={settings.job_max_s:g} s) after "
                        f"{done} of {total} images"
                    )
                if isinstance(prepared, str):
                    out.skipped.append(ingest.Skipped(entry.name, prepared))
                    continue
                if isinstance(prepared, int):  # the cache's row
                    fmt_ext = _cached_ext(out.cache, prepared)
                    cached: int | None = prepared
                else:
                    array, fmt = prepared
                    fmt_ext = images.FORMATS[fmt][0]
                    cached = None
                image_key = f"images/{digest}{fmt_ext}"
                if image_key not in written:  # the same bytes twice are stored once
                    (staging / image_key).write_bytes(data)
                    written.add(image_key)
                out.accepted.append(_Accepted(entry, image_key, digest, cached))
                if cached is not None:
                    continue
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


def _cached_ext(cache: VectorCache, row: int) -> str:
    """The file extension of a cached row's image ("images/<sha>.jpg" -> ".jpg")."""
    assert cache.catalogue is not None
    return os.path.splitext(cache.catalogue.entries[row]["image"])[1]


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


Prepared = tuple[np.ndarray, str] | str | int  # (input, format), the reason it was skipped, a cached row


def _decoded(
    zf: zipfile.ZipFile,
    entries: list[ingest.Entry],
    pool: ThreadPoolExecutor,
    size: int,
    settings: Settings,
    cache: VectorCache,
) -> Iterator[tuple[ingest.Entry, bytes, str, Prepared]]:
    """Yield each entry with its bytes, their sha256 and its decoded input (or cached row),
    decoding a window ahead in `pool`."""
    window = max(2 * settings.encode_batch_size, 4)
    Pending = tuple[ingest.Entry, bytes, str, Future[tuple[np.ndarray, str]] | str | int]
    pending: deque[Pending] = deque()

    def settle(item: Pending) -> tuple[ingest.Entry, bytes, str, Prepared]:
        entry, data, digest, job = item
        if not isinstance(job, Future):
            return entry, data, digest, job
        try:
            return entry, data, digest, job.result(timeout=settings.image_decode_max_s)
        except BadImageError as exc:
            return entry, data, digest, exc.message
        except TimeoutError:  # the decode goes on in its thread; the job does not wait for it
            return entry, data, digest, f"took over {settings.image_decode_max_s:g} s to decode"

    for entry in entries:
        # Zip reads stay on this thread (one file handle); only decoding is parallel.
        try:
            data = ingest.read_entry(zf, entry)
            digest = hashlib.sha256(data).hexdigest()
            row = cache.get(digest)
            if row is not None:
                pending.append((entry, data, digest, row))
            else:
                decode = pool.submit(
                    images.prepare, data, size, settings.max_image_pixels, settings.allowed_formats
                )
                pending.append((entry, data, digest, decode))
        except TrainingError as exc:
            pending.append((entry, b"", "", exc.message))
        if len(pending) >= window:
            yield settle(pending.popleft())
    while pending:
        yield settle(pending.popleft())
