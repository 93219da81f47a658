"""The service's parts for one process: settings, endpoints, storage, serving registry, job runner."""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from service.catalog import changes, training
from service.core import logs
from service.core.config import Settings, parse_token_settings
from service.core.endpoint import EndpointSpec, load_endpoints
from service.core.errors import (
    ConflictError,
    ForbiddenError,
    InvalidParameterError,
    ItemNotFoundError,
    PayloadTooLargeError,
)
from service.encoders import batching, litert
from service.encoders.tfruntime import configure_threads
from service.serving import jobproc
from service.serving.jobs import JobRunner, JobStore
from service.serving.query import check_item
from service.serving.queue import SqsQueue
from service.serving.registry import EndpointRuntime, Registry
from service.storage import KeyNotFoundError, Storage, open_storage, versions
from service.storage.s3 import S3Storage

log = logging.getLogger(__name__)


@dataclass
class Service:
    settings: Settings
    specs: dict[str, EndpointSpec]
    storage: Storage
    registry: Registry
    jobs: JobRunner
    uploads_dir: Path

    def image_key(self, runtime: EndpointRuntime, item_id: int, version: str | None, photo: int = 0) -> str:
        """Storage key of an item's original image (its `photo`-th), in the served version or a named one."""
        loaded = runtime.current()
        if version is None or version == loaded.version:
            check_item(loaded, item_id)
            rows = loaded.rows_of(item_id)
            image = loaded.items[int(rows[photo])]["image"] if photo < len(rows) else None
            version = loaded.version
        else:
            photos = _item_images(self.storage, runtime.spec.name, version).get(item_id, [])
            image = photos[photo] if photo < len(photos) else None
        if image is None:
            what = f"item {item_id}" if photo == 0 else f"photo {photo} of item {item_id}"
            raise ItemNotFoundError(f"no {what} in {runtime.spec.name} version {version}")
        return versions.version_prefix(runtime.spec.name, version) + image

    def check_source(self, uri: str, endpoint: str) -> None:
        """A zip in S3 a job may train from: in this endpoint's uploads, present, not too big."""
        s3 = self.storage if isinstance(self.storage, S3Storage) else None
        if s3 is None:
            raise ConflictError("training from an s3:// source needs an s3:// STORAGE_URI")
        key = s3.bucket_key(uri)
        allowed = s3.uri_of(f"uploads/{endpoint}/")
        if key is None or not uri.startswith(allowed):
            # Not another endpoint's uploads, nor anything else in (or outside) the bucket.
            raise ForbiddenError(
                f"{uri} is not in this endpoint's uploads ({allowed}; POST /{endpoint}/uploads)"
            )
        try:
            size = s3.object_size(key)
        except KeyNotFoundError:
            raise InvalidParameterError(
                f"{uri} does not exist", errors={"source": ["No such object."]}
            ) from None
        limit = self.settings.max_source_zip_mb * 1024 * 1024
        if size > limit:
            raise PayloadTooLargeError(f"{uri} is {size} bytes, over the limit of {limit}")

    def create_upload(self, endpoint: str) -> dict[str, Any]:
        """A pre-signed PUT for a new zip under uploads/, and the source URI to train from."""
        if not isinstance(self.storage, S3Storage):
            raise ConflictError(
                "pre-signed uploads need an s3:// STORAGE_URI; POST the zip to /train instead"
            )
        key = f"uploads/{endpoint}/{secrets.token_hex(8)}.zip"
        expires = self.settings.upload_url_expiry_s
        return {
            "upload_url": self.storage.signed_upload_url(key, expires),
            "method": "PUT",
            "source": self.storage.uri_of(key),
            "expires_in": expires,
        }

    def delete_items(self, endpoint: str, ids: list[int], names: list[str]) -> dict[str, Any]:
        """Delete items (404 for any unknown one, and nothing published); the new version."""
        if not ids and not names:
            raise InvalidParameterError("name at least one item to delete", errors={"ids": ["Empty."]})
        result = changes.delete_items(self.specs[endpoint], self.storage, self.settings, ids, names)
        return _change(endpoint, result)

    def edit_item(self, endpoint: str, item_id: int, edit: dict[str, Any]) -> dict[str, Any]:
        """Change an item's label and/or metadata; the new version."""
        if not edit:
            raise InvalidParameterError("send 'label' and/or 'metadata' to change")
        result = changes.edit_item(
            self.specs[endpoint],
            self.storage,
            self.settings,
            item_id,
            label=edit.get("label", changes.UNSET),
            metadata=edit.get("metadata"),
        )
        return _change(endpoint, result)

    def rollback(self, endpoint: str, version: str) -> dict[str, Any]:
        """Point CURRENT back at `version`; this instance's workers serve it from the next request."""
        versions.rollback(self.storage, endpoint, version)
        versions.note_published(self.settings.cache_dir, endpoint, version)
        return self.versions_of(endpoint)

    def job_status(self, endpoint: str, job_id: str) -> dict[str, Any]:
        """A job's status. A job that succeeded elsewhere (the worker tier) is served here from the
        next request on, like one that ran here: its version is noted for this instance."""
        status = self.jobs.status(endpoint, job_id)
        status.pop("runner", None)  # host:pid is for the logs, not for clients
        version = status.get("version")
        if status["status"] == "succeeded" and version:
            if versions.published_note(self.settings.cache_dir, endpoint)[1] != version:
                versions.note_published(self.settings.cache_dir, endpoint, version)
        return status

    def versions_of(self, endpoint: str) -> dict[str, Any]:
        """The endpoint's complete versions, oldest first, with what their manifests say."""
        current = versions.read_current(self.storage, endpoint).version
        listed = []
        for version in versions.list_versions(self.storage, endpoint):
            manifest = versions.read_manifest(self.storage, endpoint, version)
            listed.append(
                {
                    "version": version,
                    "count": manifest.get("count"),
                    "current": version == current,
                    "created_at": manifest.get("created_at"),
                    "fine_tuned": bool(manifest.get("head")),
                }
            )
        return {"endpoint": endpoint, "current": current, "versions": listed}

    def close(self) -> None:
        self.registry.stop()
        self.jobs.shutdown()


def _change(endpoint: str, result: changes.ChangeResult) -> dict[str, Any]:
    return {
        "endpoint": endpoint,
        "version": result.version,
        "kind": result.kind,
        "items": result.items,
        "count": result.count,
    }


@lru_cache(maxsize=8)
def _item_images(storage: Storage, endpoint: str, version: str) -> dict[int, list[str]]:
    """item id -> its images' keys in an older version (for image URLs handed out before a swap)."""
    prefix = versions.version_prefix(endpoint, version)
    if not versions.SAFE_VERSION.match(version) or not storage.exists(prefix + versions.MANIFEST):
        return {}  # only complete, published versions
    try:
        meta = json.loads(storage.read(versions.version_prefix(endpoint, version) + "metadata.json"))
    except KeyNotFoundError:
        return {}
    found: dict[int, list[str]] = {}
    for row, entry in sorted(meta.items(), key=lambda pair: int(pair[0])):
        item = int(entry.get("item", row))  # versions before stable ids: the row is the id
        if item >= 0:
            found.setdefault(item, []).append(entry["image"])
    return found


def _remove_leftovers(cache_dir: Path) -> None:
    """Delete uploads and work folders left by jobs whose process died (a kill, an out-of-memory
    kill, a reboot). Their names start with the owner's pid; live owners keep theirs."""
    owners = {
        int(owner)
        for folder in (cache_dir / "uploads", cache_dir / "work")
        for path in (folder.glob("*") if folder.is_dir() else [])
        if (owner := path.name.split("-", 1)[0]).isdigit()
    }
    for pid in sorted(owners):
        if not _alive(pid):
            jobproc.remove_leftovers_of(cache_dir, pid)
            log.info("removed what process %d left in %s: a job that did not finish", pid, cache_dir)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build_service(settings: Settings) -> Service:
    """Assemble the parts; endpoint files are validated here, so a bad one stops the start-up."""
    logs.configure(settings.log_level, settings.log_format)
    configure_threads(settings.tf_intra_op_threads, settings.tf_inter_op_threads)
    litert.configure_threads(settings.tf_intra_op_threads)
    batching.configure(settings.batch_window_ms)
    specs = load_endpoints(settings.endpoints_dir)
    parse_token_settings(settings.admin_token, settings.endpoint_tokens, settings.query_token, list(specs))
    if not settings.admin_token and not settings.endpoint_tokens:
        log.warning("no ADMIN_TOKEN or ENDPOINT_TOKENS: anyone who can reach this service may train it")
    storage = open_storage(
        settings.storage_uri, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
    )
    uploads = settings.cache_dir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)

    def run_training(
        endpoint: str,
        zip_path: Path,
        on_progress: training.ProgressFn,
        version: str,
        fine_tune: str,
        kind: str,
    ) -> training.TrainResult | changes.ChangeResult:
        if settings.train_in_child:  # TensorFlow loads in the child, never in this worker
            return jobproc.run_job(settings, specs[endpoint], zip_path, on_progress, version, fine_tune, kind)
        return jobproc.work(
            settings, specs[endpoint], zip_path, on_progress, version, fine_tune, kind, storage
        )

    s3 = storage if isinstance(storage, S3Storage) else None

    def fetch_source(uri: str, path: Path) -> None:
        key = s3.bucket_key(uri) if s3 else None
        if s3 is None or key is None:
            raise ForbiddenError(f"{uri} is not in this service's bucket")
        s3.download_object(key, path)

    def stage_upload(key: str, path: Path) -> str:
        storage.upload(key, path)
        return s3.uri_of(key) if s3 else key

    queue = None
    if settings.job_queue_url:
        queue = SqsQueue(settings.job_queue_url, settings.sqs_endpoint_url, settings.s3_region)
    jobs = JobRunner(
        JobStore(storage),
        run_training,
        uploads,
        fetch=fetch_source,
        stage_upload=stage_upload if s3 else None,
        queue=queue,
        stale_after_s=settings.job_stale_s,
    )
    _remove_leftovers(settings.cache_dir)
    return Service(
        settings=settings,
        specs=specs,
        storage=storage,
        registry=Registry(specs, storage, settings),
        jobs=jobs,
        uploads_dir=uploads,
    )
