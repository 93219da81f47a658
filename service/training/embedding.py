"""The embed step: read a zip's images, decode them in a thread pool, run the encoder on full batches.

Three stages overlap: the caller's thread reads the zip and writes the originals, a thread pool
decodes and resizes (PIL releases the GIL), and an encoder thread runs the forward passes. An
image whose bytes a published version already holds (same sha256, same encoder: `VectorCache`)
is neither decoded nor embedded again.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service import encoders
from service.catalog import images, ingest
from service.catalog.head import thumbnails
from service.core.config import Settings
from service.core.endpoint import HeadConfig
from service.core.errors import BadImageError, TrainingError
from service.training.cache import Cached, VectorCache
from service.training.results import Progress, ProgressFn


@dataclass
class Accepted:
    entry: ingest.Entry
    image: str  # the image's key in the version: images/<sha256><ext>
    sha256: str
    cached: Cached | None  # where the cache holds its encoder outputs, or None: embedded now
    same_as: int | None = None  # an earlier image of this job with the same bytes (embedded once)


@dataclass
class Embedded:
    """The accepted images in id order; the encoder outputs of those embedded now, in order."""

    accepted: list[Accepted] = field(default_factory=list)
    skipped: list[ingest.Skipped] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    thumbs: list[np.ndarray] = field(default_factory=list)
    mirrored: list[np.ndarray] = field(default_factory=list)
    cache: VectorCache = field(default_factory=VectorCache)
    first: dict[str, int] = field(default_factory=dict)  # digest -> its first accepted image
    refused: dict[str, str] = field(default_factory=dict)  # digest -> why its first copy was skipped
    # Gathered from a sharded job's shards: `vectors` holds every accepted image's outputs, of which
    # `reused` came from the vector cache; their originals are in the store already (`stored`).
    reused: int = 0
    stored: bool = False

    @property
    def embedded(self) -> int:
        return sum(len(v) for v in self.vectors) - self.reused


Encoder = encoders.Embedder  # TensorFlow's (through a conversion check) or a version's converted one


class _EncodeThread:
    """Forward passes on a thread of their own, fed full batches through a short queue. With a head
    to train and augmentation on, also the backbone vectors of the mirrored batch."""

    def __init__(
        self, encoder: Encoder, out: Embedded, thumb_side: int, mirror: bool, report: ProgressFn, total: int
    ) -> None:
        self.encoder, self.out, self.thumb_side, self.mirror = encoder, out, thumb_side, mirror
        self.report, self.total = report, total
        self.batches: queue.Queue[tuple[np.ndarray, int] | None] = queue.Queue(maxsize=2)
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="encode", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.batches.get()) is not None:
            inputs, done = item
            if self.failure:
                continue  # drain the queue so the producer never blocks
            try:
                self.out.vectors.append(self.encoder.encode(inputs))
                # Thumbnails are kept with every version: a later change may train a head.
                self.out.thumbs.append(thumbnails(inputs, self.thumb_side))
                if self.mirror:
                    self.out.mirrored.append(self.encoder.encode(np.ascontiguousarray(inputs[:, :, ::-1])))
                self.report(Progress("embed", done, self.total))
            except BaseException as exc:
                self.failure.append(exc)

    def put(self, batch: np.ndarray, done: int) -> None:
        self.batches.put((batch, done))

    def finish(self) -> None:
        """Wait for the passes queued so far; raise the first failure."""
        self.batches.put(None)
        self.thread.join()
        if self.failure:
            raise self.failure[0]


def embed(
    zf: ingest.Members,
    plan: ingest.ZipPlan,
    staging: Path,
    encoder: Encoder,
    settings: Settings,
    head: HeadConfig | None,
    thumb_side: int,
    report: ProgressFn,
    cache: VectorCache | None = None,
    on_original: Callable[[Path, str], None] | None = None,
) -> Embedded:
    """Decode and embed every image the cache does not hold; keep the originals in `staging/images/`
    (`on_original(path, sha256)`: called for each one embedded now, as soon as it is written)."""
    out = Embedded(cache=cache or VectorCache())
    total, batch_size = len(plan.entries), settings.encode_batch_size
    (staging / "images").mkdir()
    passes = _EncodeThread(encoder, out, thumb_side, head is not None and head.augment, report, total)
    report(Progress("embed", 0, total))
    batch = np.empty((batch_size, encoder.input_size, encoder.input_size, 3), np.uint8)
    filled = done = 0
    try:
        deadline = time.monotonic() + settings.job_max_s
        for done, (entry, data, digest, prepared) in enumerate(
            _decoded(zf, plan.entries, encoder.input_size, settings, out.cache), start=1
        ):
            if passes.failure:
                break
            _check_deadline(deadline, settings, done, total)
            array = _accept(out, staging, entry, data, digest, prepared, on_original)
            if array is None:
                continue
            batch[filled], filled = array, filled + 1
            if filled == batch_size:
                passes.put(batch, done)
                batch, filled = np.empty_like(batch), 0
        if filled:
            passes.put(batch[:filled], done)
    finally:
        passes.finish()
    report(Progress("embed", done, total))
    return out


def _check_deadline(deadline: float, settings: Settings, done: int, total: int) -> None:
    if time.monotonic() > deadline:
        raise TrainingError(
            f"the job ran over its time limit (JOB_MAX_S={settings.job_max_s:g} s) after "
            f"{done} of {total} images"
        )


def _accept(
    out: Embedded,
    staging: Path,
    entry: ingest.Entry,
    data: bytes,
    digest: str,
    prepared: Prepared,
    on_original: Callable[[Path, str], None] | None = None,
) -> np.ndarray | None:
    """Record one decoded entry; its encoder input when it still needs a forward pass."""
    if isinstance(prepared, _Again):  # bytes this job met already: that image's fate, no second pass
        prepared = out.refused.get(digest) or _Again(out.first[digest])
    if isinstance(prepared, str):
        out.skipped.append(ingest.Skipped(entry.name, prepared))
        out.refused.setdefault(digest, prepared)
        return None
    if isinstance(prepared, _Again):
        earlier = out.accepted[prepared.index]
        out.accepted.append(Accepted(entry, earlier.image, digest, earlier.cached, prepared.index))
        return None
    out.first[digest] = len(out.accepted)
    if isinstance(prepared, Cached):
        ext, cached, array = out.cache.extension(prepared), prepared, None
    else:
        array, fmt = prepared
        ext, cached = images.FORMATS[fmt][0], None
    image_key = f"images/{digest}{ext}"
    if not (staging / image_key).exists():
        (staging / image_key).write_bytes(data)
        if on_original is not None and cached is None:
            on_original(staging / image_key, digest)
    out.accepted.append(Accepted(entry, image_key, digest, cached))
    return array


@dataclass(frozen=True)
class _Again:
    """An entry whose bytes an earlier entry of the job had (`index`: that one, once accepted)."""

    index: int = -1


# (input, format), the reason it was skipped, a cached row, the same bytes as an earlier entry
Prepared = tuple[np.ndarray, str] | str | Cached | _Again
_Pending = tuple[ingest.Entry, bytes, str, "Future[tuple[np.ndarray, str]] | str | Cached | _Again"]


def _decoded(
    zf: ingest.Members, entries: list[ingest.Entry], size: int, settings: Settings, cache: VectorCache
) -> Iterator[tuple[ingest.Entry, bytes, str, Prepared]]:
    """Yield each entry with its bytes, their sha256 and its decoded input (or cached row),
    decoding a window ahead in a thread pool. Zip reads stay on this thread (one file handle)."""
    window = max(2 * settings.encode_batch_size, 4)
    pending: deque[_Pending] = deque()
    with ThreadPoolExecutor(max(1, settings.decode_threads), "decode") as pool:

        def decode(data: bytes) -> Future[tuple[np.ndarray, str]]:
            return pool.submit(
                images.prepare, data, size, settings.max_image_pixels, settings.allowed_formats
            )

        seen: set[str] = set()
        for entry in entries:
            pending.append(_read(zf, entry, cache, decode, seen))
            if len(pending) >= window:
                yield _settle(pending.popleft(), settings.image_decode_max_s)
        while pending:
            yield _settle(pending.popleft(), settings.image_decode_max_s)


def _read(
    zf: ingest.Members,
    entry: ingest.Entry,
    cache: VectorCache,
    decode: Callable[[bytes], Future[tuple[np.ndarray, str]]],
    seen: set[str],
) -> _Pending:
    """Read an entry; start decoding it unless its bytes are cached or met earlier in the job."""
    try:
        data = ingest.read_entry(zf, entry)
    except TrainingError as exc:
        return entry, b"", "", exc.message
    digest = hashlib.sha256(data).hexdigest()
    if digest in seen:
        return entry, data, digest, _Again()
    seen.add(digest)
    row = cache.get(digest)
    return entry, data, digest, (row if row is not None else decode(data))


def _settle(item: _Pending, max_s: float) -> tuple[ingest.Entry, bytes, str, Prepared]:
    entry, data, digest, job = item
    if not isinstance(job, Future):
        return entry, data, digest, job
    try:
        return entry, data, digest, job.result(timeout=max_s)
    except BadImageError as exc:
        return entry, data, digest, exc.message
    except TimeoutError:  # the decode goes on in its thread; the job does not wait for it
        return entry, data, digest, f"took over {max_s:g} s to decode"


def mirror_thumbs(thumbs: np.ndarray, side: int) -> np.ndarray:
    """Thumbnails of the mirrored images: the thumbnails mirrored (box filtering commutes with it)."""
    if side <= 0 or thumbs.shape[1] == 0:
        return thumbs
    return thumbs.reshape(len(thumbs), side, side, 3)[:, :, ::-1].reshape(len(thumbs), -1)
