"""A train or add split over the worker tier: a plan of shards (ranges of a zip's images), each
shard embedded by whichever worker takes it, and the shards' outputs gathered for one reducer.

The zip stays in S3 and is read with ranged GETs (`SharedBucket.open_object`): every worker reads
its central directory and its own members only. Every shard embeds with the same converted encoder
(the plan names its blob), so the vectors are those a single-instance job would have made; a
shard's result is one object keyed by job and shard, written once: a second delivery of the
same shard costs a re-embed at most and changes nothing. Store layout of a job's work:

    jobs/<job>/plan.json           the plan (written once, by the first delivery of the job)
    jobs/<job>/shards/<i>.npz      shard i's vectors, thumbnails, images and skipped files
    jobs/<job>/progress/<i>.json   shard i's progress (images done, when), for the job's status
    jobs/<job>/reducer             the reducer's claim (If-None-Match: exactly one reducer)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import secrets
import socket
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.catalog import ingest
from service.catalog.members import Member, MemberReader
from service.core.config import Settings
from service.core.endpoint import EndpointSpec
from service.core.errors import JobCancelledError, StorageError, TrainingError
from service.encoders import convert, litert
from service.storage import KeyNotFoundError, Storage, blobs, versions
from service.storage.blobs import ref_of
from service.storage.manifest import BlobRef, blob_key
from service.training import finetune, steps
from service.training.cache import VectorCache
from service.training.embedding import Accepted, Embedded, embed
from service.training.merge import vectors_of
from service.training.results import Progress, ProgressFn

log = logging.getLogger(__name__)

KINDS = ("train", "add")
MAX_PROGRESS_READS = 256  # shards at work a status request reads the progress of


def job_prefix(job: str) -> str:
    return f"jobs/{job}/"


def plan_key(job: str) -> str:
    return f"jobs/{job}/plan.json"


def reducer_key(job: str) -> str:
    return f"jobs/{job}/reducer"


def cancel_key(job: str) -> str:
    """The mark of a cancelled job (any job, sharded or not): every worker at work on it checks."""
    return f"jobs/{job}.cancel"


def result_key(job: str, shard: int) -> str:
    return f"jobs/{job}/shards/{shard:05d}.npz"


def progress_key(job: str, shard: int) -> str:
    return f"jobs/{job}/progress/{shard:05d}.json"


@dataclass
class ShardPlan:
    """What every shard worker and the reducer of one job agree on."""

    job: str
    endpoint: str
    kind: str  # train | add
    version: str | None
    fine_tune: str
    source: str  # the zip's key in the bucket
    etag: str  # the zip as planned: a zip replaced meanwhile fails every read
    images: int  # the zip's candidate images (its planned entries)
    ranges: list[list[int]]  # per shard: [start, end) of the planned entries in zip order (physical)
    names: list[list[str]]  # per shard: its first and last member (what an error names)
    model: dict[str, Any]  # the converted encoder's blob (sha256, size)
    encoder: dict[str, Any]  # the encoder as the manifest describes it
    runtime: dict[str, Any]  # the manifest's runtime entry
    mirror: bool  # embed mirrored copies too (a head will train with augmentation)
    head: bool = False  # the reducer trains a head (TensorFlow: it runs in a job child process)
    created: float = field(default_factory=time.time)
    token: str = ""  # names this plan's member lists (a planner that lost the race wrote its own)
    names_sha: str = ""  # sha256 of the planned entries' names: every worker must plan the same
    on_duplicate: str = "allow"  # what the reducer's train or add does with duplicates (screen.py)

    @property
    def key(self) -> str:
        return plan_key(self.job)

    def members_key(self, shard: int) -> str:
        return f"jobs/{self.job}/members/{self.token}/{shard:05d}.json"

    @property
    def model_ref(self) -> BlobRef:
        return BlobRef(str(self.model["sha256"]), int(self.model["size"]))

    def members(self, shard: int) -> str:
        """The shard's members, as an error names them."""
        (start, end), (first, last) = self.ranges[shard], self.names[shard]
        return f"{end - start} images, {first} to {last}"

    def dumps(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def read(cls, storage: Storage, job: str) -> ShardPlan | None:
        try:
            data = json.loads(storage.read(plan_key(job)))
        except KeyNotFoundError:
            return None
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@contextlib.contextmanager
def open_zip(storage: Storage, source: str, etag: str | None = None) -> Iterator[zipfile.ZipFile]:
    """The zip at `source` in the bucket, read member by member with ranged GETs."""
    bucket = storage.as_bucket()
    if bucket is None:
        raise StorageError("a sharded job needs an S3 store")
    with bucket.open_object(source, etag) as raw, ingest.open_zip(raw) as zf:
        yield zf


def candidates(storage: Storage, settings: Settings, source: str) -> int:
    """How many images the zip at `source` offers (its directory read with ranged GETs)."""
    with open_zip(storage, source) as zf:
        return len(steps.plan_zip(zf, settings).entries)


def plan(
    spec: EndpointSpec,
    storage: Storage,
    settings: Settings,
    job: str,
    kind: str,
    source: str,
    version: str | None,
    fine_tune: str,
    created: float,
    report: ProgressFn,
    on_duplicate: str = "allow",
) -> ShardPlan | None:
    """Split a train or add (KINDS) of a zip in the bucket into shards of SHARD_IMAGES images, or
    None when it runs on one worker: a small zip, or no converted encoder to share (TensorFlow
    embeds on the instance that loads it). Fanout.plan returns a plan already stored instead."""
    report(Progress("plan", 0, 1))
    bucket = storage.as_bucket()
    assert bucket is not None
    with bucket.open_object(source) as raw, ingest.open_zip(raw) as zf:
        etag = str(getattr(raw, "etag", ""))
        directory = int(getattr(zf, "start_dir", 1 << 62))  # where the central directory starts
        planned = steps.plan_zip(zf, settings)
        count = len(planned.entries)
        if count <= settings.shard_images:
            return None
        encoder = _encoder(spec, storage, settings, kind, fine_tune, zf, planned, report)
    if encoder is None:
        return None
    model, describe, runtime, mirror, head = encoder
    size = settings.shard_images
    ranges = [[s, min(s + size, count)] for s in range(0, count, size)]
    order = physical(planned)
    token = secrets.token_hex(4)
    shard_plan = ShardPlan(
        job=job,
        endpoint=spec.name,
        kind=kind,
        version=version,
        fine_tune=fine_tune,
        on_duplicate=on_duplicate,
        source=source,
        etag=etag,
        images=count,
        ranges=ranges,
        names=[[planned.entries[order[a]].name, planned.entries[order[b - 1]].name] for a, b in ranges],
        model={"sha256": model.sha256, "size": model.size},
        encoder=describe,
        runtime=runtime,
        mirror=mirror,
        head=head,
        created=created,
        token=token,
        names_sha=_names_sha(planned),
    )
    _write_members(storage, shard_plan, planned, order, directory)
    # Write once: two deliveries of one job message planning at once agree on the first plan.
    if not storage.write_if(shard_plan.key, shard_plan.dumps(), None):
        return ShardPlan.read(storage, job)
    report(Progress("plan", 1, 1))
    return shard_plan


def _encoder(
    spec: EndpointSpec,
    storage: Storage,
    settings: Settings,
    kind: str,
    fine_tune: str,
    zf: zipfile.ZipFile,
    planned: ingest.ZipPlan,
    report: ProgressFn,
) -> tuple[BlobRef, dict[str, Any], dict[str, Any], bool, bool] | None:
    """(the converted encoder's blob, its description, the runtime entry, mirror?, head?) every
    shard and the reducer use; None when the job has no converted encoder to share."""
    if kind == "add":  # the current version's converted encoder embeds the new images
        current = versions.read_current(storage, spec.name).version
        manifest = versions.read_manifest(storage, spec.name, current) if current else None
        if (
            manifest is None
            or manifest.encoder_model is None
            or fine_tune == "always"
            or settings.encoder_runtime != "litert"
            or manifest.runtime.get("name") != litert.RUNTIME
        ):
            return None
        mirror = all("mirrored" in s.files for s in manifest.segments)
        return manifest.encoder_model, dict(manifest.encoder), dict(manifest.runtime), mirror, False
    verified = steps.converted_encoder(steps.load_encoder(spec, settings, storage), settings, report)
    # The single-instance job checks the model on its first images: so does the plan.
    steps.check_converted(verified, _originals(zf, planned.entries[: 4 * convert.CHECK_IMAGES]), settings)
    path = convert.model_path(verified, settings.cache_dir)
    if verified.converted is None or path is None:
        return None
    ref = ref_of(path)
    blobs.upload_missing(storage, spec.name, [(path, ref)], set())
    wants_head = finetune.plan(fine_tune, [e.label for e in planned.entries], spec.head)
    return ref, verified.describe(), verified.runtime, wants_head and spec.head.augment, wants_head


def _originals(zf: zipfile.ZipFile, entries: list[ingest.Entry]) -> Iterator[bytes]:
    """The bytes of these entries, those that cannot be read left out."""
    for entry in entries:
        try:
            yield ingest.read_entry(zf, entry)
        except TrainingError:
            continue


# --- one shard --------------------------------------------------------------------------------------


def embed_shard(
    spec: EndpointSpec,
    storage: Storage,
    settings: Settings,
    shard_plan: ShardPlan,
    shard: int,
    report: ProgressFn,
) -> bool:
    """Embed shard `shard` and store its result; False if it was stored already (nothing done).
    The originals of its images go to the store as blobs (written once, by content)."""
    key = result_key(shard_plan.job, shard)
    if storage.exists(key):
        return False
    cache = steps.blob_cache(storage, settings)
    model = cache.path(spec.name, shard_plan.model_ref, litert.MODEL_FILE)
    encoder = litert.load(model, shard_plan.model_ref.sha256, shard_plan.encoder)
    thumb_dim = 3 * spec.head.thumbnail**2
    began = time.perf_counter()
    members = [Member.from_json(row) for row in json.loads(storage.read(shard_plan.members_key(shard)))]
    part = ingest.ZipPlan(entries=[ingest.Entry(m.name, m.label, m.info()) for m in members])
    bucket = storage.as_bucket()
    assert bucket is not None
    with (
        bucket.open_object(shard_plan.source, shard_plan.etag) as raw,
        steps.work_folder(settings, spec.name, "shard") as tmp,
    ):
        reader = MemberReader(raw, lambda: ingest.open_zip(raw))
        vectors = VectorCache.of_versions(storage, spec.name, cache, encoder.fingerprint, thumb_dim)
        head = spec.head if shard_plan.mirror else None
        opened = time.perf_counter()
        # The originals of the images embedded now go up while the encoder works on the next ones
        # (those a retained version holds are blobs already).
        with ThreadPoolExecutor(max(1, storage.upload_concurrency), "shard-upload") as pool:
            uploads: list[Future[None]] = []

            def upload(path: Path, sha256: str) -> None:
                uploads.append(pool.submit(storage.upload, blob_key(spec.name, sha256), path))

            try:
                out = embed(
                    reader,
                    part,
                    Path(tmp),
                    encoder,
                    settings,
                    head,
                    spec.head.thumbnail,
                    report,
                    vectors,
                    upload,
                )
            finally:
                reader.close()
            embedded = time.perf_counter()
            for done in uploads:
                done.result()  # the first failed upload fails the shard (it is delivered again)
        indices = {id(entry): m.index for entry, m in zip(part.entries, members, strict=True)}
        storage.write(key, _result(out, indices, {m.name: m.index for m in members}, thumb_dim))
    start, end = shard_plan.ranges[shard]
    log.info(
        "job %s shard %d: %d images; open %.2f s, embed %.2f s, store %.2f s",
        shard_plan.job,
        shard,
        end - start,
        opened - began,
        embedded - opened,
        time.perf_counter() - embedded,
    )
    return True


def _names_sha(planned: ingest.ZipPlan) -> str:
    return hashlib.sha256("\n".join(e.name for e in planned.entries).encode()).hexdigest()


def _write_members(
    storage: Storage, shard_plan: ShardPlan, planned: ingest.ZipPlan, order: list[int], directory: int
) -> None:
    """Each shard's members (where their bytes are in the zip) as one small object, so a shard
    reads its own list and members, never the zip's whole directory. Each member's bytes must end
    before the next planned member's header (zip order) or the directory: a directory entry
    claiming more is refused when it is read, not followed into other members."""
    offsets = [planned.entries[i].info.header_offset for i in order]
    ends = {i: offsets[k + 1] if k + 1 < len(order) else directory for k, i in enumerate(order)}

    def write(shard: int) -> None:
        start, end = shard_plan.ranges[shard]
        entries = [(i, planned.entries[i]) for i in order[start:end]]
        rows = [Member.of(i, e.name, e.label, e.info, ends[i]).to_json() for i, e in entries]
        storage.write(shard_plan.members_key(shard), json.dumps(rows).encode())

    with ThreadPoolExecutor(max(1, storage.upload_concurrency), "members") as pool:
        list(pool.map(write, range(len(shard_plan.ranges))))


def physical(planned: ingest.ZipPlan) -> list[int]:
    """The planned entries' indices in the order their bytes lie in the zip. A shard is a run of
    that order, so its ranged reads cover one stretch of the zip (a read-ahead serves many
    members); in name order a member would cost a GET of its own."""
    return sorted(range(len(planned.entries)), key=lambda i: planned.entries[i].info.header_offset)


def _same_plan(zf: zipfile.ZipFile, settings: Settings, shard_plan: ShardPlan) -> ingest.ZipPlan:
    planned = steps.plan_zip(zf, settings)
    if len(planned.entries) != shard_plan.images or _names_sha(planned) != shard_plan.names_sha:
        raise TrainingError(
            f"this worker plans {len(planned.entries)} images in the zip, the job's plan "
            f"{shard_plan.images}: every worker of a job must run the same settings"
        )
    return planned


def _result(out: Embedded, index: dict[int, int], by_name: dict[str, int], thumb_dim: int) -> bytes:
    """A shard's outputs as one .npz: every accepted image's vectors, and what was skipped, each
    with its index among the planned entries (where the reducer puts it back)."""
    backbone, thumbs, mirrored = vectors_of(out, thumb_dim) if out.accepted else (None, None, None)
    meta = {
        "accepted": [
            [index[id(a.entry)], a.image, a.sha256, a.cached is not None or a.same_as is not None]
            for a in out.accepted
        ],
        "skipped": [[by_name.get(s.name, -1), s.name, s.reason] for s in out.skipped],
    }
    arrays: dict[str, np.ndarray] = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    if backbone is not None and thumbs is not None:
        arrays["backbone"], arrays["thumbs"] = backbone, thumbs
        if mirrored is not None:
            arrays["mirrored"] = mirrored
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


# --- what the reducer starts from -------------------------------------------------------------------


@dataclass
class Gathered:
    """Every shard's outputs, as the job's embed step would have left them on one instance."""

    plan: ingest.ZipPlan
    embedded: Embedded
    encoder: litert.LiteEncoder
    describe: dict[str, Any]
    runtime: dict[str, Any]
    model: BlobRef
    zip_name: str


def done_shards(storage: Storage, job: str) -> set[int]:
    return {int(Path(k).stem) for k in storage.list(f"jobs/{job}/shards/") if k.endswith(".npz")}


def reducer_claim(storage: Storage, job: str) -> tuple[float, str] | None:
    """(when the reducer was claimed, the claim's tag), or None while no worker has claimed it."""
    try:
        data, tag = storage.read_tagged(reducer_key(job))
    except KeyNotFoundError:
        return None
    return float(json.loads(data).get("at", 0)), tag


def claim_reducer(storage: Storage, job: str, runner: str, previous: str | None = None) -> bool:
    """Claim the reducer of `job`: True for exactly one caller (If-None-Match on one key), or for
    the one that replaces a dead reducer's claim (`previous`: that claim's tag)."""
    stamp = json.dumps({"runner": runner, "at": time.time()}).encode()
    return storage.write_if(reducer_key(job), stamp, previous)


def gather(spec: EndpointSpec, storage: Storage, settings: Settings, shard_plan: ShardPlan) -> Gathered:
    """Read the plan's zip directory and every shard's result into one Embedded, in the planned
    entries' order: what the embed step of a single-instance job leaves."""
    with open_zip(storage, shard_plan.source, shard_plan.etag) as zf:
        planned = _same_plan(zf, settings, shard_plan)
    out = Embedded(stored=True)
    with steps.work_folder(settings, spec.name, "gather") as tmp:
        # Two passes over the shards' results (downloaded once): their rows first, then their
        # vectors written straight to their final rows: one copy of the vectors in memory.
        files = [Path(tmp) / f"{shard}.npz" for shard in range(len(shard_plan.ranges))]
        rows: list[tuple[int, str, str]] = []
        skipped: list[tuple[int, str, str]] = []
        shapes: dict[str, tuple[int, ...]] = {}
        counts: list[int] = []  # each shard's accepted images
        mirrored_everywhere = True
        for shard, path in enumerate(files):
            storage.download(result_key(shard_plan.job, shard), path)
            with np.load(path) as part:
                meta = json.loads(part["meta"].tobytes())
                rows.extend((i, image, sha256) for i, image, sha256, _ in meta["accepted"])
                counts.append(len(meta["accepted"]))
                out.reused += sum(1 for *_, again in meta["accepted"] if again)
                skipped.extend((i, name, reason) for i, name, reason in meta["skipped"])
                if meta["accepted"]:
                    shapes.update({name: part[name].shape[1:] for name in ("backbone", "thumbs")})
                    mirrored_everywhere &= "mirrored" in part
        order = np.argsort(np.array([i for i, _, _ in rows], dtype=np.int64), kind="stable")
        out.accepted = [Accepted(planned.entries[rows[r][0]], rows[r][1], rows[r][2], None) for r in order]
        out.skipped = [
            ingest.Skipped(name, reason) for _, name, reason in sorted(skipped, key=lambda x: x[0])
        ]
        if rows:
            final = np.empty(len(rows), np.int64)
            final[order] = np.arange(len(rows))  # row r of the shards' concatenation -> its place
            names = ["backbone", "thumbs", *(["mirrored"] if mirrored_everywhere else [])]
            arrays = {
                n: np.empty((len(rows), *shapes["thumbs" if n == "thumbs" else "backbone"]), np.float32)
                for n in names
            }
            seen = 0
            for path, count in zip(files, counts, strict=True):
                if count:
                    with np.load(path) as part:
                        for name, array in arrays.items():
                            array[final[seen : seen + count]] = part[name]
                seen += count
            out.vectors, out.thumbs = [arrays["backbone"]], [arrays["thumbs"]]
            if mirrored_everywhere:
                out.mirrored = [arrays["mirrored"]]
    cache = steps.blob_cache(storage, settings)
    ref = shard_plan.model_ref
    encoder = litert.load(cache.path(spec.name, ref, litert.MODEL_FILE), ref.sha256, shard_plan.encoder)
    return Gathered(
        planned,
        out,
        encoder,
        dict(shard_plan.encoder),
        dict(shard_plan.runtime),
        ref,
        Path(shard_plan.source).name,
    )


# --- progress and cancellation ------------------------------------------------------------------------


def cancelled(storage: Storage, job: str) -> bool:
    return storage.exists(cancel_key(job))


def progress_reporter(
    storage: Storage, job: str, shard: int, total: int, every_s: float = 1.0
) -> Callable[[Progress], None]:
    """Record a shard's progress (at most every `every_s`) and stop it, at its next batch, once
    the job is cancelled (JobCancelledError)."""
    started = time.time()
    last = [0.0]
    runner = f"{socket.gethostname()}:{os.getpid()}"  # the process at work on it (for the logs)

    def report(p: Progress) -> None:
        now = time.time()
        if p.stage != "embed" or (now - last[0] < every_s and p.done < p.total):
            return
        last[0] = now
        if cancelled(storage, job):
            raise JobCancelledError(job)
        record = {"done": p.done, "total": total, "started": started, "updated": now, "runner": runner}
        with contextlib.suppress(Exception):  # progress is best effort
            storage.write(progress_key(job, shard), json.dumps(record).encode())

    return report


def summary(storage: Storage, job: str, sizes: list[int], done: set[int], started: float) -> dict[str, Any]:
    """Shards done/total, images embedded/total and the rate since the job was planned, summed over
    every worker of the job (the shards at work report their own progress)."""
    images_done = sum(sizes[i] for i in done if i < len(sizes))
    running = [k for k in storage.list(f"jobs/{job}/progress/") if int(Path(k).stem) not in done]

    def count(key: str) -> int:
        try:
            return int(json.loads(storage.read(key))["done"])
        except Exception:  # finished or deleted meanwhile
            return 0

    # One per worker at work; read in parallel, at most MAX_PROGRESS_READS (the rest count as 0).
    with ThreadPoolExecutor(16, "progress") as pool:
        images_done += sum(pool.map(count, running[:MAX_PROGRESS_READS]))
    elapsed = time.time() - started
    return {
        "shards": {"done": len(done), "total": len(sizes)},
        "images": {"done": images_done, "total": sum(sizes)},
        "rate": round(images_done / elapsed, 1) if elapsed > 0 else None,
    }
