"""Job status rules that need no encoder: stale jobs, redelivered jobs, cancelled jobs."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service.core.errors import ConflictError, JobCancelledError, JobRetryError
from service.jobs.runner import Job, JobRunner, JobStore, cancel_key
from service.storage.local import LocalStorage
from service.training import sharded
from service.training.results import Progress


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


def test_a_running_job_stops_at_its_next_report_once_cancelled(tmp_path: Path) -> None:
    published: list[str] = []
    started = threading.Event()

    def slow_train(endpoint: str, zip_path: Path, report: Any, version: str, *rest: Any) -> Any:
        started.set()
        for done in range(600):  # a minute of batches, unless it is stopped
            report(Progress("embed", done, 600))
            time.sleep(0.1)
        published.append(version)
        raise AssertionError("a cancelled job ran to the end")

    store = JobStore(LocalStorage(tmp_path / "store"))
    runner = JobRunner(store, slow_train, tmp_path, progress_interval_s=0.05)
    zips = [tmp_path / "a.zip", tmp_path / "b.zip"]
    for path in zips:
        path.write_bytes(b"PK")
    running = runner.submit("food", zips[0])
    waiting = runner.submit("food", zips[1])  # behind it in this process's queue
    assert started.wait(10)
    assert runner.cancel("food", waiting.id).status == "cancelled"
    assert runner.cancel("food", running.id).status == "running"  # stops at its next report
    deadline = time.monotonic() + 10
    while runner.status("food", running.id).status == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runner.status("food", running.id).status == "cancelled"
    runner.shutdown()
    assert runner.status("food", waiting.id).status == "cancelled"
    assert published == [] and not zips[1].exists()
    with pytest.raises(ConflictError, match="cancelled already"):
        runner.cancel("food", running.id)


def test_a_shard_stops_at_its_next_batch_once_its_job_is_cancelled(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    report = sharded.progress_reporter(storage, "0123456789abcdef", 3, 100, every_s=0)
    report(Progress("embed", 10, 100))
    assert json.loads(storage.read(sharded.progress_key("0123456789abcdef", 3)))["done"] == 10
    storage.write(cancel_key("0123456789abcdef"), b"")
    with pytest.raises(JobCancelledError):
        report(Progress("embed", 20, 100))
