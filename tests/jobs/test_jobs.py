"""Job status rules that need no encoder: stale jobs, redelivered jobs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service.core.errors import JobRetryError
from service.jobs.runner import Job, JobRunner, JobStore
from service.storage.local import LocalStorage


class RecordingQueue:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


def never_train(*args: Any) -> Any:
    raise AssertionError("this job must not run")


def stored(tmp_path: Path, status: str, age_s: float) -> tuple[JobStore, Job]:
    store = JobStore(LocalStorage(tmp_path / "store"))
    job = Job(id="0123456789abcdef", endpoint="food", status=status, runner="elsewhere:42")
    store.save(job)
    data = json.loads(store.storage.read(f"jobs/{job.id}.json"))
    data["updated_at"] = (datetime.now(UTC) - timedelta(seconds=age_s)).isoformat(timespec="seconds")
    store.storage.write(f"jobs/{job.id}.json", json.dumps(data).encode())
    return store, job


def test_a_silent_running_job_is_reported_failed_without_a_queue(tmp_path: Path) -> None:
    store, job = stored(tmp_path, "running", age_s=120)
    runner = JobRunner(store, never_train, tmp_path, stale_after_s=60)
    status = runner.status("food", job.id)
    assert status.status == "failed" and status.error and "stopped" in status.error
    assert "elsewhere" not in status.error  # no host:pid in answers (the store keeps it)
    assert store.load("food", job.id).status == "failed"  # recorded, not just reported
    runner.shutdown()


def test_with_a_queue_a_silent_job_is_left_to_redelivery(tmp_path: Path) -> None:
    store, job = stored(tmp_path, "running", age_s=120)
    runner = JobRunner(store, never_train, tmp_path, queue=RecordingQueue(), stale_after_s=60)
    assert runner.status("food", job.id).status == "running"
    runner.shutdown()


def test_a_job_still_running_elsewhere_is_not_run_twice(tmp_path: Path) -> None:
    store, job = stored(tmp_path, "running", age_s=1)
    runner = JobRunner(store, never_train, tmp_path, queue=RecordingQueue(), stale_after_s=60)
    with pytest.raises(JobRetryError, match="still running on elsewhere:42"):
        runner.run_delivered(job.id, attempt=2, max_attempts=3)
    runner.shutdown()


def test_a_fresh_job_is_not_stale(tmp_path: Path) -> None:
    store, job = stored(tmp_path, "running", age_s=5)
    runner = JobRunner(store, never_train, tmp_path, stale_after_s=60)
    assert runner.status("food", job.id).status == "running"
    runner.shutdown()
