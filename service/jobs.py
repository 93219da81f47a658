"""Training jobs: queued in-process, run in the background, status persisted in storage.

Status lives at `jobs/<job_id>.json` in the store, so any worker process (or instance) can
answer `GET /<endpoint>/jobs/<id>`, whichever one runs the job.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import JobNotFoundError, ServiceError, TrainingError
from .storage import KeyNotFoundError, Storage
from .training import Progress, TrainResult

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^[0-9a-f]{16}$")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Job:
    id: str
    endpoint: str
    status: str = "queued"  # queued | running | succeeded | failed
    stage: str | None = None
    done: int = 0
    total: int = 0
    version: str | None = None
    error: str | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class JobStore:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def save(self, job: Job) -> None:
        job.updated_at = _now()
        self.storage.write(f"jobs/{job.id}.json", json.dumps(job.to_dict()).encode())

    def load(self, endpoint: str, job_id: str) -> Job:
        if not JOB_ID.match(job_id):
            raise JobNotFoundError(endpoint, job_id)
        try:
            data = json.loads(self.storage.read(f"jobs/{job_id}.json"))
        except KeyNotFoundError:
            raise JobNotFoundError(endpoint, job_id) from None
        if data.get("endpoint") != endpoint:
            raise JobNotFoundError(endpoint, job_id)
        return Job(**data)


TrainFn = Callable[[str, Path, Callable[[Progress], None]], TrainResult]


class JobRunner:
    """Runs one training job at a time per process, in a background thread."""

    def __init__(self, store: JobStore, train: TrainFn, progress_interval_s: float = 0.5) -> None:
        self.store = store
        self.train = train
        self.progress_interval_s = progress_interval_s
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="train")

    def submit(self, endpoint: str, zip_path: Path) -> Job:
        """Queue a job for the zip at `zip_path` (the job deletes it when done)."""
        job = Job(id=secrets.token_hex(8), endpoint=endpoint)
        self.store.save(job)
        self._pool.submit(self._run, job, zip_path)
        return job

    def _run(self, job: Job, zip_path: Path) -> None:
        job.status = "running"
        self.store.save(job)
        last_save = 0.0
        lock = threading.Lock()

        def on_progress(p: Progress) -> None:
            nonlocal last_save
            with lock:
                changed_stage = p.stage != job.stage
                job.stage, job.done, job.total = p.stage, p.done, p.total
                if changed_stage or time.monotonic() - last_save >= self.progress_interval_s:
                    last_save = time.monotonic()
                    self.store.save(job)

        try:
            result: TrainResult = self.train(job.endpoint, zip_path, on_progress)
            job.status, job.version = "succeeded", result.version
            job.counts = result.counts
            job.skipped = [{"name": s.name, "reason": s.reason} for s in result.skipped]
        except TrainingError as exc:
            job.status, job.error = "failed", exc.message
            job.skipped = [{"name": s.name, "reason": s.reason} for s in exc.skipped]
        except ServiceError as exc:
            job.status, job.error = "failed", exc.message
        except Exception as exc:  # a bug: keep the details in the log, give the client a summary
            log.exception("training job %s failed", job.id)
            job.status, job.error = "failed", f"internal error ({type(exc).__name__}); see the log"
        finally:
            zip_path.unlink(missing_ok=True)
        log.info("job %s for %s %s %s", job.id, job.endpoint, job.status, job.error or job.version)
        try:
            self.store.save(job)
        except Exception:  # the store itself is failing; nothing else can record it
            log.exception("could not save the final status of job %s", job.id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
