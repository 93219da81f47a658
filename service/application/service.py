"""`Service`: every use case of the service as a method; the HTTP views and the CLI call these and
nothing below them (an import-linter contract in pyproject.toml keeps it so)."""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from service import encoders
from service.application import duplicates
from service.application.results import (
    ChangeOutcome,
    Health,
    ImageSource,
    SearchArgs,
    SearchResult,
    UploadTicket,
    VersionInfo,
    VersionList,
    WorkerOutcome,
)
from service.catalog import images, ingest
from service.catalog.view import View
from service.core.config import Settings
from service.core.endpoint import EndpointSpec
from service.core.errors import (
    ConflictError,
    ForbiddenError,
    IntegrityError,
    InvalidParameterError,
    ItemNotFoundError,
    JobNotFoundError,
    JobRetryError,
    PayloadTooLargeError,
    ReportNotFoundError,
    ServiceError,
)
from service.encoders import mirror
from service.jobs import child
from service.jobs.runner import Job, JobRunner
from service.serving import duplicate_records, filters, query
from service.serving.registry import LoadedVersion, Registry, ServedEndpoint
from service.storage import KeyNotFoundError, Storage, encoder_mirror, gc, versions
from service.storage.blobs import BlobCache
from service.storage.manifest import Manifest
from service.training import changes, compaction, steps
from service.training.base import read_base
from service.training.results import ChangeResult, ProgressFn, TrainResult
from service.training.train import train

# (item id, which of its photos, version) -> this service's URL of that image (the API's route)
RouteUrl = Callable[[int, int, str], str]


@dataclass
class Service:
    settings: Settings
    specs: dict[str, EndpointSpec]
    storage: Storage
    registry: Registry
    jobs: JobRunner
    uploads_dir: Path
    blobs: BlobCache
    _views: dict[tuple[str, str], View] = field(default_factory=dict, repr=False)
    _views_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # --- the service and its endpoints ---------------------------------------------------------

    def health(self, details: bool) -> Health:
        """Liveness; which process answers and what it serves only for callers who may see it."""
        if not details:
            return Health()
        problems = {n: s.error for n, s in self.registry.endpoints.items() if s.error}
        return Health(
            worker=os.getpid(), endpoints=self.registry.versions_served(), problems=problems or None
        )

    def endpoint(self, name: str) -> ServedEndpoint:
        """The named endpoint (404 if there is none)."""
        return self.registry.get(name)

    def endpoint_status(self, name: str) -> dict[str, Any]:
        """Served version, item count, labels, encoder, trained time, degraded state."""
        return self.endpoint(name).status()

    def endpoints_status(self) -> list[dict[str, Any]]:
        return [served.status() for served in self.registry.endpoints.values()]

    # --- queries -----------------------------------------------------------------------------------

    def search_args(
        self,
        name: str,
        k: int | None,
        labels: list[str] | None,
        where: str | None,
        duplicates: bool = False,
        duplicates_only: bool = False,
    ) -> SearchArgs:
        """A query's arguments checked (k within the endpoint's bounds, a well-formed filter);
        `duplicates`: mark each result that duplicates the query (`duplicates_only`: keep just those)."""
        spec = self.endpoint(name).spec
        marks = None
        if duplicates or duplicates_only:
            marks = query.Duplicates(spec.duplicate_threshold, duplicates_only)
        return SearchArgs(query.check_k(spec, k), filters.parse_filter(labels, where), marks)

    def infer(
        self, name: str, uploads: list[tuple[str, bytes]], args: SearchArgs, route_url: RouteUrl
    ) -> SearchResult:
        """The top-k matches for each uploaded image (filename, bytes)."""
        if len(uploads) > self.settings.max_infer_images:
            raise PayloadTooLargeError(
                f"{len(uploads)} images in one request, over the limit of {self.settings.max_infer_images}"
            )
        loaded = self.endpoint(name).current()
        found = query.search_images(
            loaded,
            uploads,
            args.k,
            self.settings.max_image_pixels,
            self._image_urls(route_url),
            self.settings.allowed_formats,
            args.filter,
            args.duplicates,
        )
        return SearchResult(name, loaded.version, found)

    def similar(self, name: str, item_id: int, args: SearchArgs, route_url: RouteUrl) -> SearchResult:
        """The top-k items most like an indexed item (the item itself excluded)."""
        loaded = self.endpoint(name).current()
        found = query.similar_items(loaded, item_id, args.k, self._image_urls(route_url), args.filter)
        return SearchResult(name, loaded.version, [found], id=item_id)

    def _image_urls(self, route_url: RouteUrl) -> query.ImageUrlFn:
        """Results' image URLs: pre-signed store URLs where the store gives them (S3), else the
        service's own image route."""

        def build(loaded: LoadedVersion, item_id: int, photo: int, key: str, mimetype: str | None) -> str:
            signed = self.storage.signed_url(key, self.settings.signed_url_expiry_s, mimetype)
            return signed or route_url(item_id, photo, loaded.version)

        return build

    def item_image(self, name: str, item_id: int, photo: int, version: str | None) -> ImageSource:
        """An item's `photo`-th original image, in the served version or a named one."""
        key, image = self._image_key(self.endpoint(name), item_id, version, photo)
        mimetype = images.CONTENT_TYPES.get(os.path.splitext(image)[1], "application/octet-stream")
        local = self.storage.local_path(key)
        if local is not None:
            return ImageSource(mimetype, path=local, versioned=version is not None)
        signed = self.storage.signed_url(key, self.settings.signed_url_expiry_s, mimetype)
        if signed:  # the bytes come straight from the store, not through this tier
            return ImageSource(mimetype, url=signed)
        return ImageSource(mimetype, data=self.storage.read(key))

    def _image_key(
        self, served: ServedEndpoint, item_id: int, version: str | None, photo: int
    ) -> tuple[str, str]:
        """The store key of an item's `photo`-th image, and its entry's image name (its type)."""
        loaded = served.current()
        view = loaded.view if version is None or version == loaded.version else self._view_of(served, version)
        found = view.item_rows(item_id) if view is not None else None
        if found is None or photo >= len(found.rows):
            what = f"item {item_id}" if photo == 0 else f"photo {photo} of item {item_id}"
            raise ItemNotFoundError(f"no {what} in {served.spec.name} version {version or loaded.version}")
        segment = view.segments[found.segment]  # type: ignore[union-attr]
        image = segment.entry(int(found.rows[photo]))["image"]
        return segment.ref.image_key(served.spec.name, image), image

    def _view_of(self, served: ServedEndpoint, version: str) -> View | None:
        """An older version's catalog (image URLs handed out before a swap name theirs); None when
        there is no such complete version."""
        with self._views_lock:
            view = self._views.get((served.spec.name, version))
        if view is None:
            try:
                manifest = versions.read_manifest(self.storage, served.spec.name, version)
            except (KeyNotFoundError, IntegrityError):
                return None
            fetch = lambda ref, label: self.blobs.path(served.spec.name, ref, label)  # noqa: E731
            loaded = served.loaded
            view = View.open(manifest, fetch, served.spec.search_k, loaded.view if loaded else None)
            with self._views_lock:
                self._views[(served.spec.name, version)] = view
                while len(self._views) > 8:
                    self._views.pop(next(iter(self._views)))
        return view

    def query_file(self, name: str, path: Path, k: int | None) -> SearchResult:
        """The CLI's query: one image file; results' images as file:// URIs where the store has them."""
        args = self.search_args(name, k, None, None)

        def file_uri(
            loaded: LoadedVersion, item_id: int, photo: int, key: str, mimetype: str | None
        ) -> str | None:
            local = self.storage.local_path(key)
            return local.as_uri() if local else None

        loaded = self.endpoint(name).current()
        found = query.search_images(
            loaded, [(path.name, path.read_bytes())], args.k, self.settings.max_image_pixels, file_uri
        )
        return SearchResult(name, loaded.version, found)

    # --- duplicates ----------------------------------------------------------------------------

    def start_duplicates(self, name: str, threshold: float | None) -> Job:
        """A job that reports the served version's duplicates (409 when nothing is trained)."""
        served = self.endpoint(name)
        chosen = duplicates.check_threshold(
            served.spec.duplicate_threshold if threshold is None else threshold
        )
        if versions.read_current(self.storage, name).version is None:
            raise ConflictError(f"{name} has no trained version to report on; train it first")
        return self.jobs.submit(name, kind="duplicates", options={"threshold": chosen})

    def run_duplicates(self, job: Job, progress: ProgressFn) -> dict[str, Any]:
        """A duplicates job's work (the runner's reporter): in a job child, like a train, so its
        minute of Python never competes with this worker's requests."""
        spec = self.endpoint(job.endpoint).spec
        threshold = float(job.options.get("threshold") or spec.duplicate_threshold)
        if not self.settings.train_in_child:
            return duplicates.run_job(self.settings, spec, job.id, threshold, progress)
        outcome: dict[str, Any] = child.run_in_child(
            self.settings, spec, progress, duplicates.run_job, job.id, threshold, progress
        )
        return outcome

    def duplicates_report(self, name: str, job_id: str, route_url: RouteUrl) -> dict[str, Any]:
        """A duplicates job: its status, and once it has succeeded its report (its version, the
        version served now, `stale` when they differ), each item with its image URL."""
        try:
            job = self.job_status(name, job_id)
        except JobNotFoundError:
            raise ReportNotFoundError(name, job_id) from None
        if job.kind != "duplicates":
            raise ReportNotFoundError(name, job_id)
        status = {k: getattr(job, k) for k in ("id", "status", "stage", "done", "total", "error")}
        if job.status != "succeeded":
            return {"endpoint": name, **status, "threshold": job.options.get("threshold"), "groups": []}
        report = duplicate_records.load_report(self.storage, job.id)
        current = versions.read_current(self.storage, name).version  # not this worker's: the store's
        return {**status, **duplicates.for_client(report, current, route_url)}

    def duplicates_now(self, name: str, threshold: float | None) -> dict[str, Any]:
        """The CLI's report: run here, not as a job; images as file:// URIs where the store has them."""
        spec = self.endpoint(name).spec
        chosen = duplicates.check_threshold(spec.duplicate_threshold if threshold is None else threshold)
        base = read_base(self.storage, name, self.blobs, spec.search_k)
        if base is None:
            raise ConflictError(f"{name} has no trained version to report on; train it first")
        with steps.work_folder(self.settings, name, "duplicates") as tmp:
            report = duplicates.run(base.view, base.manifest, self.storage, chosen, Path(tmp), lambda p: None)

        def file_uri(item_id: int, photo: int, version: str) -> str:
            image = self.item_image(name, item_id, photo, version)
            return image.path.as_uri() if image.path else (image.url or "")

        return duplicates.for_client(report, base.version, file_uri)

    def duplicates_csv(self, report: dict[str, Any]) -> str:
        return duplicates.to_csv(report)

    def not_duplicates(self, name: str) -> list[list[int]]:
        self.endpoint(name)
        return duplicate_records.read_marks(self.storage, name)

    def mark_not_duplicates(self, name: str, ids: list[int]) -> list[list[int]]:
        """Remember a group as "not duplicates": the next reports leave it out. Every id must be an
        item of the current version (404 otherwise)."""
        spec = self.endpoint(name).spec
        duplicate_records.check_group(ids)
        base = read_base(self.storage, name, self.blobs, spec.search_k)
        unknown = sorted({i for i in ids if base is None or base.view.item_rows(i) is None})
        if unknown:
            raise ItemNotFoundError(f"{name} has no items {unknown[:20]}; nothing was marked")
        return duplicate_records.mark_not_duplicates(self.storage, name, ids)

    def unmark_not_duplicates(self, name: str, ids: list[int]) -> list[list[int]]:
        """Forget a "not duplicates" mark (404 when there is none of exactly these items)."""
        self.endpoint(name)
        return duplicate_records.unmark(self.storage, name, ids)

    def evaluate(self, name: str, zip_path: Path, k: int = 10) -> dict[str, Any]:
        """Precision@1, precision@k and mAP@k of the served version on a labelled zip."""
        return query.evaluate_zip(self.endpoint(name).current(), zip_path, self.settings, k)

    # --- training jobs ---------------------------------------------------------------------------

    def new_upload_path(self) -> Path:
        """Where an upload is written on this instance (named for its owner: leftovers are removed)."""
        return self.uploads_dir / f"{os.getpid()}-{secrets.token_hex(8)}.zip"

    def write_images_zip(
        self,
        path: Path,
        uploads: list[tuple[str, bytes]],
        label: str | None,
        metadata: dict[str, Any] | None,
        item_name: str | None,
    ) -> None:
        """Images sent directly (with their label and metadata) as a zip in the /train format."""
        if metadata is not None:
            ingest.check_metadata(metadata)
        ingest.write_images_zip(path, uploads, label, metadata, item_name)

    def start_job(
        self, name: str, zip_path: Path, fine_tune: str, kind: str = "train", on_duplicate: str = "allow"
    ) -> Job:
        """Check an uploaded zip (422 if it is none, 413 over the limits) and start a job on it;
        the file is the job's from then on (deleted when it is done, or now if refused)."""
        self.endpoint(name)
        try:
            with ingest.open_zip(zip_path) as zf:
                ingest.check_limits(zf, ingest.ZipLimits.from_settings(self.settings))
            return self.jobs.submit(
                name, zip_path=zip_path, fine_tune=fine_tune, kind=kind, on_duplicate=on_duplicate
            )
        except BaseException:
            zip_path.unlink(missing_ok=True)
            raise

    def start_job_from_source(
        self, name: str, source: str, fine_tune: str, on_duplicate: str = "allow"
    ) -> Job:
        """A train from a zip uploaded to the store beforehand (`create_upload`)."""
        self.endpoint(name)
        self._check_source(source, name)
        return self.jobs.submit(name, source=source, fine_tune=fine_tune, on_duplicate=on_duplicate)

    def _check_source(self, uri: str, endpoint: str) -> None:
        """A zip in the bucket a job may train from: in this endpoint's uploads, present, not too big."""
        bucket = self.storage.as_bucket()
        if bucket is None:
            raise ConflictError("training from an s3:// source needs an s3:// STORAGE_URI")
        key = bucket.bucket_key(uri)
        allowed = bucket.uri_of(f"uploads/{endpoint}/")
        if key is None or not uri.startswith(allowed):
            # Not another endpoint's uploads, nor anything else in (or outside) the bucket.
            raise ForbiddenError(
                f"{uri} is not in this endpoint's uploads ({allowed}; POST /{endpoint}/uploads)"
            )
        try:
            size = bucket.object_size(key)
        except KeyNotFoundError:
            raise InvalidParameterError(
                f"{uri} does not exist", errors={"source": ["No such object."]}
            ) from None
        limit = self.settings.max_source_zip_mb * 1024 * 1024
        if size > limit:
            raise PayloadTooLargeError(f"{uri} is {size} bytes, over the limit of {limit}")

    def create_upload(self, name: str) -> UploadTicket:
        """A pre-signed PUT for a new zip under uploads/, and the source URI to train from."""
        self.endpoint(name)
        bucket = self.storage.as_bucket()
        if bucket is None:
            raise ConflictError(
                "pre-signed uploads need an s3:// STORAGE_URI; POST the zip to /train instead"
            )
        key = f"uploads/{name}/{secrets.token_hex(8)}.zip"
        expires = self.settings.upload_url_expiry_s
        return UploadTicket(bucket.signed_upload_url(key, expires), "PUT", bucket.uri_of(key), expires)

    def job_status(self, name: str, job_id: str) -> Job:
        """A job's status. A job that succeeded elsewhere (the worker tier) is served here from the
        next request on, like one that ran here: its version is noted for this instance."""
        self.endpoint(name)
        job = self.jobs.status(name, job_id)
        if job.status == "succeeded" and job.version and job.kind != "duplicates":  # a report publishes none
            if versions.published_note(self.settings.cache_dir, name)[1] != job.version:
                versions.note_published(self.settings.cache_dir, name, job.version)
        return replace(job, runner=None)  # host:pid is for the logs, not for clients

    def cancel_job(self, name: str, job_id: str) -> Job:
        """Cancel a queued or running job (a 409 once it has finished)."""
        self.endpoint(name)
        return replace(self.jobs.cancel(name, job_id), runner=None)

    def run_delivered_job(self, job_id: str, receive_count: int, shard: int | None = None) -> WorkerOutcome:
        """Run a job (or one of its shards) the queue delivered (worker tier); `finished` False asks
        for a redelivery."""
        finished = self.jobs.run_delivered(job_id, receive_count, self.settings.job_max_attempts, shard)
        job = self.jobs.store.load(None, job_id)
        if not finished:
            raise JobRetryError(f"job {job.id}: {job.error}")
        return WorkerOutcome(job.id, job.status, job.error, finished)

    def train_now(self, name: str, zip_path: Path, fine_tune: str, progress: ProgressFn) -> TrainResult:
        """Train in this process and publish (the CLI's `train`)."""
        return train(
            self.endpoint(name).spec, zip_path, self.storage, self.settings, progress, fine_tune=fine_tune
        )

    # --- item changes ------------------------------------------------------------------------------

    def delete_items(self, name: str, ids: list[int], names: list[str]) -> ChangeOutcome:
        """Delete items (404 for any unknown one, and nothing published); the new version."""
        served = self.endpoint(name)
        if not ids and not names:
            raise InvalidParameterError("name at least one item to delete", errors={"ids": ["Empty."]})
        view = served.loaded.view if served.loaded else None
        result = changes.delete_items(served.spec, self.storage, self.settings, ids, names, self.blobs, view)
        self.after_change(name, result)
        return _outcome(name, result)

    def edit_item(self, name: str, item_id: int, edit: dict[str, Any]) -> ChangeOutcome:
        """Change an item's label and/or metadata; the new version."""
        served = self.endpoint(name)
        result = changes.edit_item(
            served.spec,
            self.storage,
            self.settings,
            item_id,
            label=edit.get("label", changes.UNSET),
            metadata=edit.get("metadata", changes.UNSET),
            cache=self.blobs,
            served=served.loaded.view if served.loaded else None,
        )
        self.after_change(name, result)
        return _outcome(name, result)

    # --- compaction, migration, garbage --------------------------------------------------------

    def after_change(self, name: str, result: TrainResult | ChangeResult) -> None:
        """Queue a compaction when a change left the catalog past the policy's bounds (once: not
        while this process has one queued or running)."""
        manifest = result.manifest if isinstance(result, ChangeResult) else None
        policy = compaction.Policy.from_settings(self.settings)
        if manifest is not None and compaction.due(manifest, policy) and not self.jobs.compacting(name):
            job = self.jobs.submit(name, kind="compact")
            logging.getLogger(__name__).info("%s: compaction queued as job %s", name, job.id)

    def compact(self, name: str) -> Job:
        """Start a compaction job now (409 when the policy finds nothing to merge)."""
        self.endpoint(name)
        manifest = self._current_manifest(name)
        if manifest is None or not compaction.due(manifest, compaction.Policy.from_settings(self.settings)):
            raise ConflictError(f"{name} has nothing to compact (see COMPACT_* in docs/CONFIGURATION.md)")
        if self.jobs.compacting(name):
            raise ConflictError(f"{name} is being compacted already (a job queued or running here)")
        return self.jobs.submit(name, kind="compact")

    def _current_manifest(self, name: str) -> Manifest | None:
        current = versions.read_current(self.storage, name).version
        return None if current is None else versions.read_manifest(self.storage, name, current)

    def migrate(self, name: str) -> ChangeOutcome:
        """Convert the endpoint's current version to content-addressed storage (if it is not)."""
        result = changes.migrate(self.endpoint(name).spec, self.storage, self.settings, self.blobs)
        if result.manifest is not None:
            versions.note_published(self.settings.cache_dir, name, result.version)
        return _outcome(name, result)

    def collect_garbage(self, name: str) -> gc.Collected:
        """Delete the endpoint's blobs no retained version references (a sweep of the store)."""
        self.endpoint(name)
        return gc.sweep(self.storage, name)

    # --- versions --------------------------------------------------------------------------------

    def versions_of(self, name: str) -> VersionList:
        """The endpoint's complete versions, oldest first, with what their manifests say."""
        self.endpoint(name)
        current = versions.read_current(self.storage, name).version
        listed = []
        for version in versions.list_versions(self.storage, name):
            manifest = versions.read_manifest(self.storage, name, version)
            listed.append(
                VersionInfo(
                    version=version,
                    count=manifest.count,
                    current=version == current,
                    created_at=manifest.created_at or None,
                    fine_tuned=manifest.head is not None,
                    change=str(manifest.change.get("kind") or "train"),
                    segments=len(manifest.segments),
                )
            )
        return VersionList(name, current, listed)

    def rollback(self, name: str, version: str) -> VersionList:
        """Point CURRENT back at `version`; this instance's workers serve it from the next request.
        Its files are checked first (fetched into this instance's cache): a damaged version is a 409."""
        self.endpoint(name)
        try:
            target: Manifest | None = versions.read_manifest(self.storage, name, version)
        except KeyNotFoundError:
            target = None  # versions.rollback says why
        if target is not None:
            steps.verify_carried(name, target, self.blobs, everything=True)
        versions.rollback(self.storage, name, version)
        versions.note_published(self.settings.cache_dir, name, version)
        return self.versions_of(name)

    def delete_version(self, name: str, version: str) -> VersionList:
        """Delete a version that is not the current one."""
        self.endpoint(name)
        deleted = versions.delete_version(self.storage, name, version)
        gc.collect_pruned(self.storage, name, [deleted])
        return self.versions_of(name)

    # --- operations ------------------------------------------------------------------------------

    def mirror_encoders(self) -> list[str]:
        """Download each endpoint's TF-Hub handle here and copy it into the bucket's mirror; a line
        per endpoint saying what was done."""
        target = encoder_mirror(self.settings, self.storage)
        if target is None:
            raise ConflictError("the mirror needs an s3:// STORAGE_URI or ENCODER_MIRROR_URI")
        done = []
        for name, spec in self.specs.items():
            if not spec.encoder.is_remote:
                done.append(f"{name}: {spec.encoder.source} is not a TF-Hub handle; nothing to mirror")
                continue
            folder = encoders.fetch_handle(spec.encoder.source, self.settings.hub_cache)
            prefix = mirror.upload(target, spec.encoder.source, folder)
            done.append(f"{name}: {spec.encoder.source} -> {target.uri}/{prefix}")
        return done

    def store_origin(self) -> str | None:
        """The store's origin where results' image URLs point into it (pre-signed URLs), '' where
        they never do, None when the store cannot sign now (ask again later)."""
        try:
            url = self.storage.signed_url("page-csp-probe", 60)  # signed here: no request is made
        except ServiceError:
            return None
        parts = urlsplit(url or "")
        return f"{parts.scheme}://{parts.netloc}" if url else ""

    def start(self) -> None:
        """Load every endpoint's version in the background, then follow CURRENT (web workers)."""
        self.registry.start()

    def close(self) -> None:
        self.registry.stop()
        self.jobs.shutdown()


def _outcome(endpoint: str, result: ChangeResult) -> ChangeOutcome:
    return ChangeOutcome(
        endpoint, result.version, result.kind, result.items, result.count, result.manifest is not None
    )
