"""Content-addressed blobs: uploading a version's new files once, this instance's verified cache of
them, and the leases that keep garbage collection away from blobs a build may still reference.

Keys are `<endpoint>/blobs/<ab>/<sha256>` (manifest.blob_key): a blob's name is its content, so it
is written once and never rewritten, and a version that keeps a file of its base uploads nothing.

Leases (the way builders and the collector stay out of each other's way, like OCI registries' and
LanceDB's "in-progress writers"): every build writes `<endpoint>/leases/<id>` before it reads its
base, then looks for `<endpoint>/GC_LOCK`; the collector writes GC_LOCK, then lists the leases, and
deletes nothing while one is live. With S3's strong read-after-write consistency, a build and a
collection never both go ahead: whichever wrote second sees the other's file.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from service.core import metrics
from service.core.errors import InsufficientStorageError, IntegrityError, StorageError
from service.storage.base import KeyNotFoundError, Storage
from service.storage.manifest import BlobRef, blob_key

log = logging.getLogger(__name__)

GC_LOCK = "GC_LOCK"
LEASES = "leases/"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ref_of(path: Path) -> BlobRef:
    return BlobRef(sha256_file(path), path.stat().st_size)


# --- uploading -----------------------------------------------------------------------------------


def upload_missing(
    storage: Storage, endpoint: str, files: Iterable[tuple[Path, BlobRef]], known: set[str]
) -> int:
    """Upload each (local file, its ref) the store does not hold yet, as far as `known` (the sha256s
    the base version references) tells: no request is spent asking. Returns the bytes uploaded."""
    todo = {ref.sha256: (path, ref) for path, ref in files if ref.sha256 not in known}
    jobs: list[Callable[[], None]] = [
        partial(storage.upload, blob_key(endpoint, sha), path) for sha, (path, _) in todo.items()
    ]
    if storage.upload_concurrency > 1 and len(jobs) > 1:  # many small images to a network store
        with ThreadPoolExecutor(storage.upload_concurrency, thread_name_prefix="upload") as pool:
            for future in [pool.submit(job) for job in jobs]:
                future.result()  # the first failure fails the publish
    else:
        for job in jobs:
            job()
    return sum(ref.size for _, ref in todo.values())


# --- this instance's cache -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Seen:
    size: int
    mtime_ns: int


class BlobCache:
    """Blobs on this instance, by sha256: read in place from a local store, else downloaded once into
    CACHE_DIR/blobs/<endpoint>/ (to a temporary name, checked, then renamed) and shared by the
    instance's workers; a folder per endpoint, so one endpoint's eviction never judges another's.
    Each process checks a file's sha256 the first time it uses it, so a blob corrupted in the cache
    (or in a local store) is never served: it is fetched again, or the load fails."""

    def __init__(self, storage: Storage, cache_dir: Path) -> None:
        self.storage = storage
        self.folder = cache_dir / "blobs"
        self._checked: dict[Path, _Seen] = {}
        self._lock = threading.Lock()

    def path(self, endpoint: str, ref: BlobRef, label: str = "") -> Path:
        """A local, verified file holding `ref`'s bytes; `label` says what it is, in errors."""
        key = f"{label} ({ref.key_in(endpoint)})" if label else ref.key_in(endpoint)
        local = self.storage.local_path(ref.key_in(endpoint))
        if local is not None:
            self._verify(local, ref, key)
            return local
        target = self._target(endpoint, ref)
        if target.exists():
            try:
                self._verify(target, ref, key)
                metrics.BLOB_CACHE.labels("hit").inc()
                return target
            except IntegrityError as exc:
                log.error("%s; fetching it again", exc.message)
                target.unlink(missing_ok=True)
        return self._download(ref.key_in(endpoint), ref, target, key)

    def _download(self, key: str, ref: BlobRef, target: Path, label: str) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_name(target.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one download per blob per instance
            if target.exists():  # another worker fetched it meanwhile
                self._verify(target, ref, label)
                return target
            fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{ref.sha256[:12]}.", suffix=".part")
            os.close(fd)
            tmp = Path(name)
            try:
                self.storage.download(key, tmp)
                self._verify(tmp, ref, label)
                os.replace(tmp, target)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise InsufficientStorageError(
                        f"this instance's blob cache ({self.folder}) is full: {label} could not be fetched"
                    ) from None
                raise
            finally:
                tmp.unlink(missing_ok=True)
        metrics.BLOB_CACHE.labels("miss").inc()
        metrics.BLOB_CACHE_BYTES.inc(ref.size)
        with self._lock:
            self._checked[target] = _Seen(ref.size, target.stat().st_mtime_ns)
        return target

    def held(self, endpoint: str, ref: BlobRef, label: str = "") -> Path | None:
        """`ref`'s file if this instance holds it (a local store, or this cache), checked; None if it
        would have to be downloaded. IntegrityError when the bytes held do not match."""
        local = self.storage.local_path(ref.key_in(endpoint))
        path = local if local is not None else self._target(endpoint, ref)
        if not path.exists():
            return None
        self._verify(path, ref, f"{label} ({ref.key_in(endpoint)})" if label else ref.key_in(endpoint))
        return path

    def _verify(self, path: Path, ref: BlobRef, key: str) -> None:
        stat = path.stat() if path.exists() else None
        if stat is None:
            raise IntegrityError(f"{key} is missing")
        seen = _Seen(stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if self._checked.get(path) == seen:
                return
        if stat.st_size != ref.size or sha256_file(path) != ref.sha256:
            raise IntegrityError(f"{key} does not match its sha256 (the manifest's is {ref.sha256[:12]}...)")
        with self._lock:
            self._checked[path] = seen

    def read_bytes(self, endpoint: str, ref: BlobRef, label: str = "") -> bytes:
        return self.path(endpoint, ref, label).read_bytes()

    def _target(self, endpoint: str, ref: BlobRef) -> Path:
        return self.folder / endpoint / ref.sha256[:2] / ref.sha256

    def touch(self, endpoint: str, refs: Iterable[BlobRef]) -> None:
        """Mark cached blobs as in use by a version a worker serves now: a `.used` file beside each
        (the blob's own time stamp stays as it was checked, so no worker hashes it again)."""
        for ref in refs:
            target = self._target(endpoint, ref)
            if self.storage.local_path(ref.key_in(endpoint)) is None and target.exists():
                target.with_name(target.name + ".used").touch()

    def evict(self, endpoint: str, keep: set[str], min_age_s: float = 600) -> int:
        """Remove the endpoint's cached blobs not in `keep` that no worker of this instance marked as
        in use for `min_age_s` (every worker marks what it serves when it loads a version). Returns
        the bytes freed. Open memory maps of a removed file stay valid until they are closed."""
        freed = 0
        folder = self.folder / endpoint
        if not folder.is_dir():
            return 0
        now = time.time()
        for path in folder.glob("*/*"):
            if path.suffix in (".lock", ".part", ".used") or path.name in keep:
                continue
            used = path.with_name(path.name + ".used")
            try:
                stat = path.stat()
                last = max(stat.st_mtime, used.stat().st_mtime if used.exists() else 0.0)
                if now - last > min_age_s:
                    path.unlink()
                    used.unlink(missing_ok=True)
                    path.with_name(path.name + ".lock").unlink(missing_ok=True)
                    freed += stat.st_size
            except FileNotFoundError:
                continue
        return freed


# --- leases and the collector's lock -------------------------------------------------------------------


@dataclass(frozen=True)
class _Stamp:
    started: float
    expires: float

    @classmethod
    def read(cls, data: bytes) -> _Stamp | None:
        try:
            raw = json.loads(data)
            return cls(float(raw["started"]), float(raw["expires"]))
        except (ValueError, KeyError, TypeError):
            return None

    def dumps(self) -> bytes:
        return json.dumps({"started": self.started, "expires": self.expires}).encode()


# How long a build waits for a collection under way before it gives up (past a dead collector's lock).
LEASE_WAIT_S = 90.0
# A build's lease lasts this long unless renewed (it is, every third of it, while the build runs): a
# build that dies holds collections back for at most this long, and a long one keeps its lease.
LEASE_S = 300.0


class Lease:
    """A build lease, renewed by a thread while held: a new key with a later expiry, then the old
    key deleted (the collector reads expiries from the keys' names, so it never sees a gap)."""

    def __init__(self, storage: Storage, endpoint: str) -> None:
        self.storage, self.endpoint = storage, endpoint
        self.expires = 0.0
        self.key = ""
        self.lost = False
        self._done = threading.Event()
        self._renewer: threading.Thread | None = None

    def _write(self) -> None:
        expires = time.time() + LEASE_S
        key = f"{self.endpoint}/{LEASES}{expires:.3f}-{secrets.token_hex(6)}"
        self.storage.write(key, b"")
        old, self.key, self.expires = self.key, key, expires
        if old:
            self.storage.delete(old)

    def _intact(self) -> bool:
        """Not expired, and still in the store: a collector deletes the leases it judges expired (by
        its own clock) before it deletes anything, so a lease gone means a collection may have run."""
        return time.time() <= self.expires and self.storage.exists(self.key)

    def check(self) -> None:
        """Raise StorageError unless the lease has been held without a gap: a collection may have
        deleted blobs this build counts on once it lapsed, so what it built must not be published."""
        if not self.lost and not self._intact():
            self.lost = True
        if self.lost:
            raise StorageError(f"the build lease on {self.endpoint} lapsed; nothing was published")

    def _renew(self) -> None:
        while not self._done.wait(LEASE_S / 3):
            try:
                if not self._intact():
                    self.lost = True  # a gap: a collection may have run meanwhile
                    return
                self._write()
            except StorageError as exc:  # tried again in a third of the lease
                log.warning("could not renew the build lease on %s: %s", self.endpoint, exc)

    def start(self) -> None:
        self._renewer = threading.Thread(target=self._renew, name="build-lease", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        self._done.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            self.storage.delete(self.key)
        except StorageError as exc:  # expires by itself
            log.warning("could not remove the build lease %s: %s", self.key, exc)


@contextmanager
def lease(storage: Storage, endpoint: str) -> Iterator[Lease]:
    """Hold a build lease on `endpoint` for the block: garbage collection deletes nothing meanwhile.
    Waits while a collection holds its lock (at most LEASE_WAIT_S). Publish with `check()` first."""
    held = Lease(storage, endpoint)
    deadline = time.monotonic() + LEASE_WAIT_S
    while True:
        held._write()
        if not _live(storage, f"{endpoint}/{GC_LOCK}"):
            break
        storage.delete(held.key)  # a collection is under way: let it finish first
        held.key = ""
        if time.monotonic() > deadline:
            raise StorageError(f"garbage collection of {endpoint} held its lock for over {LEASE_WAIT_S:g} s")
        time.sleep(0.5)
    held.start()
    try:
        yield held
    finally:
        held.release()


def _lease_expires(key: str) -> float:
    try:
        return float(key.rsplit("/", 1)[-1].split("-", 1)[0])
    except ValueError:
        return float("inf")  # not ours to judge: treat as live


def _live(storage: Storage, key: str) -> bool:
    try:
        stamp = _Stamp.read(storage.read(key))
    except KeyNotFoundError:
        return False
    return stamp is not None and stamp.expires > time.time()


# The collector's lock lasts this long unless renewed (it is, every third of it, while held): a
# collector that dies holds builds back for at most this long.
GC_LOCK_S = 60.0


@contextmanager
def collector_lock(storage: Storage, endpoint: str) -> Iterator[bool]:
    """Take the collector's lock; yields False (and holds nothing) while a build holds a lease or
    another collection runs: the caller then deletes nothing, and tries again another time."""
    key = f"{endpoint}/{GC_LOCK}"
    now = time.time()
    stamp = _Stamp(now, now + GC_LOCK_S)
    try:
        data, tag = storage.read_tagged(key)
        old = _Stamp.read(data)
        taken = (old is None or old.expires <= now) and storage.write_if(key, stamp.dumps(), tag)
    except KeyNotFoundError:
        taken = storage.write_if(key, stamp.dumps(), None)
    if not taken:
        yield False
        return
    done = threading.Event()
    renew = threading.Thread(target=_renew, args=(storage, key, done), name="gc-lock", daemon=True)
    renew.start()
    try:
        leases = storage.list(f"{endpoint}/{LEASES}")
        live = [k for k in leases if _lease_expires(k) > now]
        for stale in set(leases) - set(live):
            storage.delete(stale)  # a crashed build's
        yield not live
    finally:
        done.set()
        renew.join()
        storage.delete(key)


def _renew(storage: Storage, key: str, done: threading.Event) -> None:
    while not done.wait(GC_LOCK_S / 3):
        try:
            storage.write(key, _Stamp(time.time(), time.time() + GC_LOCK_S).dumps())
        except StorageError as exc:
            log.warning("could not renew %s: %s", key, exc)
