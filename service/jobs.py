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

from . import versions
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
    fine_tune: str = "auto"
    evaluation: dict[str, Any] = field(default_factory=dict)
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


# train(endpoint, zip_path, on_progress, version, fine_tune) -> TrainResult
TrainFn = Callable[[str, Path, Callable[[Progress], None], str, str], TrainResult]


class JobRunner:
    """Runs one training job at a time per process, in a background thread.

    The store is the record every worker reads; this process also keeps its own jobs in memory
    until their final status is stored, so it can answer for them while the store is down.
    """

    def __init__(
        self,
        store: JobStore,
        train: TrainFn,
        progress_interval_s: float = 0.5,
        final_save_retry_s: float = 600,
    ) -> None:
        self.store = store
        self.train = train
        self.progress_interval_s = progress_interval_s
        self.final_save_retry_s = final_save_retry_s
        self.live: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="train")
        self._closing = threading.Event()

    def submit(self, endpoint: str, zip_path: Path, fine_tune: str = "auto") -> Job:
        """Queue a job for the zip at `zip_path` (the job deletes it when done)."""
        job = Job(id=secrets.token_hex(8), endpoint=endpoint, fine_tune=fine_tune)
        # Named now, not when the job starts: a zip queued behind another job is still older
        # than one uploaded after it, and "the newest upload wins" (versions.publish).
        version = versions.new_version_id()
        try:
            self.store.save(job)  # a store that is down refuses the job now, not silently later
        except Exception:
            zip_path.unlink(missing_ok=True)
            raise
        with self._lock:
            self.live[job.id] = job
        self._pool.submit(self._run, job, zip_path, version)
        return job

    def status(self, endpoint: str, job_id: str) -> dict[str, Any]:
        """A job's status: this process's own copy while it has one, else the stored record."""
        with self._lock:
            job = self.live.get(job_id)
            if job is not None and job.endpoint == endpoint:
                return job.to_dict()
        return self.store.load(endpoint, job_id).to_dict()

    def _save(self, job: Job) -> None:
        with self._lock:
            snapshot = Job(**job.to_dict())
        try:
            self.store.save(snapshot)
        except Exception as exc:  # progress is best effort; the final status is retried
            log.warning("could not save the status of job %s: %s", job.id, exc)

    def _run(self, job: Job, zip_path: Path, version: str) -> None:
        job.status = "running"
        self._save(job)
        last_save = 0.0

        def on_progress(p: Progress) -> None:
            nonlocal last_save
            with self._lock:
                changed_stage = p.stage != job.stage
                job.stage, job.done, job.total = p.stage, p.done, p.total
            if changed_stage or time.monotonic() - last_save >= self.progress_interval_s:
                last_save = time.monotonic()
                self._save(job)

        try:
            result: TrainResult = self.train(job.endpoint, zip_path, on_progress, version, job.fine_tune)
            outcome = {
                "status": "succeeded",
                "version": result.version,
                "evaluation": result.evaluation,
                "counts": result.counts,
                "skipped": [{"name": s.name, "reason": s.reason} for s in result.skipped],
            }
        except TrainingError as exc:
            outcome = {
                "status": "failed",
                "error": exc.message,
                "skipped": [{"name": s.name, "reason": s.reason} for s in exc.skipped],
            }
        except ServiceError as exc:
            outcome = {"status": "failed", "error": exc.message}
        except Exception as exc:  # a bug: keep the details in the log, give the client a summary
            log.exception("training job %s failed", job.id)
            outcome = {"status": "failed", "error": f"internal error ({type(exc).__name__}); see the log"}
        finally:
            zip_path.unlink(missing_ok=True)
        with self._lock:
            for name, value in outcome.items():
                setattr(job, name, value)
        log.info("job %s for %s %s %s", job.id, job.endpoint, job.status, job.error or job.version)
        self._store_final(job)

    def _store_final(self, job: Job) -> None:
        """Store the final status, retrying with backoff while the store is unreachable."""
        delay, deadline = 0.5, time.monotonic() + self.final_save_retry_s
        while True:
            try:
                self.store.save(job)
                break
            except Exception as exc:
                if time.monotonic() > deadline or self._closing.is_set():
                    log.error("gave up storing the final status of job %s: %s", job.id, exc)
                    return
                self._closing.wait(delay)
                delay = min(delay * 2, 15)
        with self._lock:
            self.live.pop(job.id, None)

    def shutdown(self) -> None:
        self._closing.set()
        self._pool.shutdown(wait=True, cancel_futures=False)
