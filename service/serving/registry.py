"""Serving state: each worker loads the version CURRENT names, and swaps when CURRENT changes.

A loaded version is immutable; a swap builds the new one completely (files verified, index
opened and warmed, encoder loaded) and then replaces one reference. Requests already holding
the old version finish on it, so none fails during a swap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from service import encoders
from service.catalog.head import FUSED_FILE, Head, HeadEncoder
from service.catalog.segment import Segment
from service.catalog.view import View
from service.core import metrics
from service.core.config import Settings
from service.core.endpoint import EndpointSpec, QueryConfig
from service.core.errors import (
    EncoderUnavailableError,
    EndpointLoadingError,
    EndpointNotFoundError,
    EndpointUnavailableError,
    InsufficientStorageError,
    IntegrityError,
    NotTrainedError,
    ServiceError,
    StorageError,
)
from service.encoders import Embedder, litert
from service.storage import Storage, encoder_mirror, versions
from service.storage.blobs import BlobCache
from service.storage.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedVersion:
    """One published version, ready to answer queries."""

    endpoint: str
    version: str
    manifest: Manifest
    encoder: Embedder  # the backbone, or backbone + the version's own head
    view: View  # its segments, with its deletions and edits
    runtime: dict[str, Any]  # {"name": "litert" | "tensorflow", ...}: what runs the encoder, and why
    query: QueryConfig = QueryConfig()  # how its queries are treated (the endpoint file's [query])

    @property
    def count(self) -> int:
        """Items (not rows: replaced and deleted rows stay in their segment until compaction)."""
        return self.manifest.count


def _fused(
    spec: EndpointSpec, manifest: Manifest, cache: BlobCache, backbone: Embedder, runtime: dict[str, Any]
) -> tuple[litert.LiteEncoder | None, str]:
    """The version's backbone and head in one converted model (service/training/fuse.py), when it
    has one and runs on LiteRT, and how its head is served. None: the head runs in NumPy after the
    backbone's invoke, the same answers (to 1e-4): a missing, damaged or foreign head.tflite only
    costs speed. Loaded for this version alone, not cached by content like a backbone (each train
    makes a new one): it goes when the version does."""
    assert manifest.head is not None
    ref = manifest.head.files.get(FUSED_FILE)
    if ref is None:
        return None, "numpy (the version has no fused model)"
    if runtime.get("name") != litert.RUNTIME:
        return None, "numpy (the backbone runs on TensorFlow)"
    try:
        fused = litert.LiteEncoder(cache.path(spec.name, ref, FUSED_FILE), dict(manifest.encoder))
        if fused.input_size != backbone.input_size or fused.dim != manifest.head.feature_dim + backbone.dim:
            raise EncoderUnavailableError(f"{FUSED_FILE} maps {fused.input_size}px to {fused.dim} values")
    except (EncoderUnavailableError, IntegrityError, StorageError) as exc:
        log.warning("%s version %s: the head runs in NumPy: %s", spec.name, manifest.version, exc.message)
        return None, f"numpy ({exc.message})"
    return fused, "fused"


def _backbone(
    storage: Storage,
    spec: EndpointSpec,
    manifest: Manifest,
    cache: BlobCache,
    settings: Settings,
) -> tuple[Embedder, dict[str, Any]]:
    """The version's own encoder (not whatever the endpoint file names today: vectors of two
    encoders are not comparable), and the runtime that runs it: the converted model with LiteRT
    when the version has one (no TensorFlow in this process), else TensorFlow."""
    recorded = dict(manifest.encoder)
    runtime = dict(manifest.runtime)
    if runtime.get("name") == litert.RUNTIME and settings.encoder_runtime == "tensorflow":
        # The operator's switch back to TensorFlow, for versions converted before it was set too.
        runtime = {"name": "tensorflow", "reason": "ENCODER_RUNTIME=tensorflow"}
    if runtime.get("name") == litert.RUNTIME:
        try:
            if manifest.encoder_model is None:
                raise EncoderUnavailableError(f"the manifest lists no {litert.MODEL_FILE}")
            path = cache.path(spec.name, manifest.encoder_model, litert.MODEL_FILE)
            converted = litert.load(path, manifest.encoder_model.sha256, recorded)
            if converted.input_size != int(recorded.get("input_size") or converted.input_size):
                raise EncoderUnavailableError(f"{litert.MODEL_FILE} takes {converted.input_size}px images")
            return converted, {"name": litert.RUNTIME, **{k: v for k, v in runtime.items() if k != "name"}}
        except EncoderUnavailableError as exc:  # e.g. LiteRT not installed here: TensorFlow still can
            log.warning("%s version %s: serving with TensorFlow: %s", spec.name, manifest.version, exc)
            runtime = {
                "name": "tensorflow",
                "reason": f"the converted model could not be loaded: {exc.message}",
            }
    source = encoders.EncoderSource.from_dict(recorded)
    if source.kind == "offline":  # found by name where this instance keeps it; fingerprint below
        source = encoders.offline_source(settings.models_dir)
    elif source.kind in ("hub", "mirror"):  # the same handle, fetched the way this instance does
        source = replace(source, kind="mirror" if settings.encoder_mode == "mirror" else "hub")
    backbone = encoders.load(source, settings.hub_cache, encoder_mirror(settings, storage))
    if recorded.get("fingerprint") not in (None, backbone.fingerprint):
        raise IntegrityError(
            f"{spec.name} version {manifest.version} was built by encoder {recorded['location']} with "
            f"fingerprint {recorded['fingerprint']}, but that encoder now has fingerprint "
            f"{backbone.fingerprint}; retrain the endpoint"
        )
    return backbone, runtime


def load_version(
    storage: Storage,
    spec: EndpointSpec,
    version: str,
    settings: Settings,
    cache: BlobCache,
    previous: LoadedVersion | None = None,
) -> LoadedVersion:
    """Fetch, verify and open a published version together with the encoder that built it. Only
    the blobs `previous` (the version served now) does not share are fetched and opened."""
    manifest = versions.read_manifest(storage, spec.name, version)
    view = View.open(
        manifest,
        lambda ref, label: cache.path(spec.name, ref, label),
        spec.search_k,
        previous.view if previous else None,
    )
    backbone, runtime = _backbone(storage, spec, manifest, cache, settings)
    encoder: Embedder = backbone
    if manifest.head is not None:  # a fine-tuned version: its own head on top of that backbone
        files = manifest.head.files
        head = Head.from_files(
            cache.path(spec.name, files["head.json"], "head.json"),
            cache.path(spec.name, files["head.npz"], "head.npz"),
        )
        if head.fingerprint != manifest.head.fingerprint:
            raise IntegrityError(f"{spec.name} version {version}: the head does not match its manifest")
        fused, how = (
            _fused(spec, manifest, cache, backbone, runtime)
            if settings.fuse_head
            else (None, "numpy (FUSE_HEAD=0)")
        )
        # How the head was fused when trained (the manifest), and what serves it in this process
        runtime = {**runtime, "head": {**(runtime.get("head") or {}), "served": how}}
        encoder = HeadEncoder(backbone, head, fused)
    if encoder.dim != manifest.dim:
        raise IntegrityError(
            f"{spec.name} version {version}: encoder gives {encoder.dim}-d vectors, "
            f"the index holds {manifest.dim}-d"
        )
    for segment in view.segments:
        _open(segment)
    return LoadedVersion(spec.name, version, manifest, encoder, view, runtime, spec.query)


def _open(segment: Segment) -> None:
    """Fetch and check everything a query reads (memory-mapped: workers share the pages), so a
    version whose files fail their checks is refused before it is served; warm its index."""
    _ = segment.items, segment.names, segment.entries, segment.deleted, segment.overlay
    if segment.index is not None:
        segment.index.warm()
    else:
        _ = segment.vectors


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment else None


class ServedEndpoint:
    """The serving state of one endpoint in this process."""

    # How long a request waits for a load under way before it answers 503 "loading".
    load_wait_s = 20.0

    def __init__(self, spec: EndpointSpec, storage: Storage, settings: Settings, cache: BlobCache) -> None:
        self.spec = spec
        self.storage = storage
        self.settings = settings
        self.cache = cache
        self.loaded: LoadedVersion | None = None
        self.checked = False  # CURRENT read at least once
        self.error: str | None = None  # why the latest check or load failed, if it did
        self.loading: str | None = None  # the version being loaded right now
        self.degraded_since: datetime | None = None  # since when the store is unreachable
        self._seen_tag: str | None = None  # CURRENT's tag when last handled (loaded or refused)
        self._note_seen = 0  # the published note's time stamp when last looked at
        self._lock = threading.Lock()

    def refresh(self, force: bool = False, wait_s: float = -1) -> bool:
        """Load the version CURRENT names if it is not the one served; True if it swapped.

        `force`: read CURRENT even if its tag looks unchanged (a version published here).
        `wait_s`: give up (False) after waiting this long for a load another thread has under way.

        Each check is one cheap request (CURRENT's tag: a HEAD on S3). While the store cannot be
        reached the endpoint keeps serving what it has and is marked degraded; a version that
        fails its integrity checks is refused once, not re-downloaded every round.
        """
        if not self._lock.acquire(timeout=wait_s):
            return False
        with self._lock_held():
            key = f"{self.spec.name}/{versions.CURRENT}"
            try:
                tag = self.storage.tag(key)
                if tag is None or (tag == self._seen_tag and not force):
                    self._reachable()
                    return False
                pointer = versions.read_current(self.storage, self.spec.name)
                self._reachable()
                if pointer.version is None or (self.loaded and pointer.version == self.loaded.version):
                    self._seen_tag = pointer.tag
                    return False
                started = time.monotonic()
                self.loading = pointer.version
                fresh = load_version(
                    self.storage, self.spec, pointer.version, self.settings, self.cache, self.loaded
                )
            except InsufficientStorageError as exc:  # the disk may be freed: try again next round
                return self._failed(exc.message)
            except StorageError as exc:
                if not isinstance(exc, IntegrityError):
                    return self._unreachable(exc.message)  # try again next round
                self._seen_tag = tag
                return self._failed(exc.message)
            except ServiceError as exc:
                self._seen_tag = tag
                return self._failed(exc.message)
            except Exception as exc:  # a corrupt file can surface as anything; keep serving
                log.exception("%s: loading the current version failed", self.spec.name)
                self._seen_tag = tag
                return self._failed(f"could not load the current version: {type(exc).__name__}")
            finally:
                self.loading = None
                self.checked = True
            previous = self.loaded
            self.loaded, self.error, self._seen_tag = fresh, None, pointer.tag
            metrics.SERVED_VERSION.labels(self.spec.name).set(versions.created_at(fresh.version))
            metrics.SEGMENTS.labels(self.spec.name).set(len(fresh.manifest.segments))
            log.info(
                "%s: serving version %s (%d items, loaded in %.2fs)",
                self.spec.name,
                fresh.version,
                fresh.count,
                time.monotonic() - started,
            )
        self._keep_cache(fresh, previous)
        return True

    def _keep_cache(self, fresh: LoadedVersion, previous: LoadedVersion | None) -> None:
        """Mark the blobs this worker serves as in use; drop those no version served for a while."""
        held = [ref for loaded in (fresh, previous) if loaded for ref in loaded.manifest.blobs()]
        self.cache.touch(self.spec.name, held)
        self.cache.evict(self.spec.name, {ref.sha256 for ref in held})

    @contextmanager
    def _lock_held(self) -> Iterator[None]:
        """Release the lock `refresh` acquired (with a timeout) when the block ends."""
        try:
            yield
        finally:
            self._lock.release()

    def _reachable(self) -> None:
        self.checked = True
        if self.degraded_since is not None:
            metrics.DEGRADED.labels(self.spec.name).set(0)
            log.info("%s: storage reachable again", self.spec.name)
            self.degraded_since = None
            self.error = None

    def _unreachable(self, message: str) -> bool:
        if self.degraded_since is None:
            self.degraded_since = datetime.now(UTC)
            metrics.DEGRADED.labels(self.spec.name).set(1)
            log.error("%s: storage unreachable, serving what is loaded: %s", self.spec.name, message)
        self.error = message
        return False

    def _failed(self, message: str) -> bool:
        if self.error != message:
            log.error("%s: cannot load the current version: %s", self.spec.name, message)
        self.error = message
        return False

    def current(self) -> LoadedVersion:
        """The version to answer a query with.

        Before answering, a cheap look (one stat) at this instance's note of the last version
        published here: a job or change that reported success is served from the next request
        on, in every worker. A worker with nothing loaded loads (or waits for the load of) the
        current version rather than answering "loading".
        """
        self._follow_note()
        loaded = self.loaded
        if loaded is None:
            self.refresh(wait_s=self.load_wait_s)  # or waits for the load another thread runs
            loaded = self.loaded
        if loaded is not None:
            return loaded
        if self.loading:
            raise EndpointLoadingError(
                f"endpoint {self.spec.name!r} is loading version {self.loading}; retry in a few seconds"
            )
        if self.error:
            raise EndpointUnavailableError(f"endpoint {self.spec.name!r} is unavailable: {self.error}")
        raise NotTrainedError(
            f"endpoint {self.spec.name!r} has no trained version yet: POST a zip of images to "
            f"/{self.spec.name}/train"
        )

    def _follow_note(self) -> None:
        """Load the version this instance last published, if it is not the one served."""
        stamp, noted = versions.published_note(self.settings.cache_dir, self.spec.name)
        if stamp == self._note_seen:
            return
        if noted is not None and (self.loaded is None or self.loaded.version != noted):
            self.refresh(force=True, wait_s=self.load_wait_s)
        # Marked seen only once handled: a request arriving while another loads the version waits
        # for that load (on the lock in refresh) instead of answering from the old one.
        self._note_seen = stamp

    def status(self) -> dict[str, Any]:
        self._follow_note()
        if not self.checked and not self.loading:
            self.refresh()  # nobody has read CURRENT yet (e.g. no warm-up thread)
        loaded = self.loaded
        if loaded:
            state = "ready"
        elif self.loading:
            state = "loading"
        else:
            state = "failed" if self.error else "untrained"
        info: dict[str, Any] = {
            **self.spec.summary(),
            "status": state,
            "version": None,
            "count": 0,
            "labels": {},
            "trained_at": None,
            "error": self.error,
            "degraded": self.degraded_since is not None,
            "degraded_since": self.degraded_since.isoformat(timespec="seconds")
            if self.degraded_since
            else None,
        }
        if loaded:
            manifest = loaded.manifest
            info.update(
                version=loaded.version,
                count=loaded.count,
                labels=dict(manifest.labels),
                trained_at=manifest.created_at or None,
                encoder={**info["encoder"], "serving": public_encoder(dict(manifest.encoder))},
                runtime=loaded.runtime,
            )
        return info


def public_encoder(recorded: dict[str, Any]) -> dict[str, Any]:
    """What a version's manifest says of its encoder, less where it sits on a server's disk
    (TF-Hub handles are public and stay)."""
    shown = {k: v for k, v in recorded.items() if k != "location"}
    if recorded.get("kind") in ("hub", "mirror"):
        shown["location"] = recorded.get("location")
    return shown


class Registry:
    """All endpoints of this process, and the thread that keeps them on their CURRENT version."""

    def __init__(
        self, specs: dict[str, EndpointSpec], storage: Storage, settings: Settings, cache: BlobCache
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.endpoints = {name: ServedEndpoint(s, storage, settings, cache) for name, s in specs.items()}
        self.started_at = datetime.now(UTC)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def get(self, name: str) -> ServedEndpoint:
        try:
            return self.endpoints[name]
        except KeyError:
            raise EndpointNotFoundError(name, sorted(self.endpoints)) from None

    def refresh_all(self) -> None:
        for served in self.endpoints.values():
            served.refresh()

    def start(self) -> None:
        """Load every endpoint in the background, then poll CURRENT every watch interval."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="version-watcher", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh_all()
            except Exception:  # never let the watcher die; the next round tries again
                log.exception("version watcher round failed")
            self._stop.wait(self.settings.watch_interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def versions_served(self) -> dict[str, str | None]:
        return {n: (r.loaded.version if r.loaded else None) for n, r in self.endpoints.items()}
