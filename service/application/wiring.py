"""One process's wiring: settings, endpoints, storage, the serving registry and the job runner,
assembled into a `Service` (a web worker, the worker tier, or a CLI command)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.application.service import Service
from service.core import logs
from service.core.config import Settings, parse_token_settings
from service.core.endpoint import EndpointSpec, load_endpoints
from service.core.errors import ForbiddenError
from service.encoders import batching, litert
from service.encoders.tfruntime import configure_threads
from service.jobs import child
from service.jobs.fanout import Fanout
from service.jobs.queue import SqsQueue
from service.jobs.runner import JobRunner, JobStore
from service.serving.registry import Registry
from service.storage import open_storage
from service.storage.blobs import BlobCache
from service.training import changes
from service.training.results import ChangeResult, ProgressFn, TrainResult

log = logging.getLogger(__name__)


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
            child.remove_leftovers_of(cache_dir, pid)
            log.info("removed what process %d left in %s: a job that did not finish", pid, cache_dir)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie answers signals but is dead: a job's child whose worker was killed stays one where
    # nothing reaps orphans (a container without an init).
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def build_service(settings: Settings) -> Service:
    """Assemble the parts; endpoint files are validated here, so a bad one stops the start-up."""
    logs.configure(settings.log_level, settings.log_format)
    configure_threads(settings.tf_intra_op_threads, settings.tf_inter_op_threads)
    # A lone pass on every core answers a query sooner; the worker tier (shards) keeps to its share.
    lone = settings.lone_pass_all_cores and settings.service_role == "web"
    litert.configure_threads(settings.tf_intra_op_threads, lone)
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
        on_progress: ProgressFn,
        version: str,
        fine_tune: str,
        kind: str,
        on_duplicate: str = "allow",
    ) -> TrainResult | ChangeResult:
        spec = specs[endpoint]
        # TensorFlow loads in a child, never in this worker; work that needs none runs here: a
        # compaction, and an add the current version's converted encoder embeds by itself.
        light = kind == "compact" or (
            kind == "add" and not changes.needs_tensorflow(spec, storage, settings, fine_tune)
        )
        if not settings.train_in_child:
            return child.work(
                settings, spec, zip_path, on_progress, version, fine_tune, kind, storage, True, on_duplicate
            )
        if light:
            try:  # never loads TensorFlow here: the version may have changed since the check
                return child.work(
                    settings,
                    spec,
                    zip_path,
                    on_progress,
                    version,
                    fine_tune,
                    kind,
                    storage,
                    False,
                    on_duplicate,
                )
            except changes.NeedsTensorFlow:
                pass
        return child.run_job(settings, spec, zip_path, on_progress, version, fine_tune, kind, on_duplicate)

    bucket = storage.as_bucket()

    def fetch_source(uri: str, path: Path) -> None:
        key = bucket.bucket_key(uri) if bucket else None
        if bucket is None or key is None:
            raise ForbiddenError(f"{uri} is not in this service's bucket")
        bucket.download_object(key, path)

    def stage_upload(key: str, path: Path) -> str:
        storage.upload(key, path)
        return bucket.uri_of(key) if bucket else key

    queue = None
    if settings.job_queue_url:
        queue = SqsQueue(settings.job_queue_url, settings.sqs_endpoint_url, settings.s3_region)
    started: list[Service] = []  # the Service, once made: what follows a job needs it

    def after_job(endpoint: str, result: TrainResult | ChangeResult) -> None:
        if started:
            started[0].after_change(endpoint, result)

    def isolate(fn: Callable[..., Any], spec: EndpointSpec, report: ProgressFn, *args: Any) -> Any:
        if not settings.train_in_child:
            return fn(settings, spec, *args)
        return child.run_in_child(settings, spec, report, fn, *args)

    fan = None
    if queue is not None and bucket is not None and settings.service_role == "worker":
        fan = Fanout(storage, settings, specs, queue, isolate)
    jobs = JobRunner(
        JobStore(storage),
        run_training,
        uploads,
        fetch=fetch_source,
        stage_upload=stage_upload if bucket else None,
        queue=queue,
        stale_after_s=settings.job_stale_s,
        on_success=after_job,
        fanout=fan,
        reporter=lambda job, progress: started[0].run_duplicates(job, progress),
    )
    _remove_leftovers(settings.cache_dir)
    cache = BlobCache(storage, settings.cache_dir)
    service = Service(
        settings=settings,
        specs=specs,
        storage=storage,
        registry=Registry(specs, storage, settings, cache),
        jobs=jobs,
        uploads_dir=uploads,
        blobs=cache,
    )
    started.append(service)
    return service


def build_offline_encoder(settings: Settings) -> Path:
    """Build the bundled offline encoder into MODELS_DIR (`make encoder`); needs no service."""
    from service.encoders.offline import build

    settings.models_dir.mkdir(parents=True, exist_ok=True)
    return build(settings.models_dir)
