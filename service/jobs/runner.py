"""Training jobs: created by the web tier, run in-process or by the worker tier, status in storage.

Status lives at `jobs/<job_id>.json` in the store, so any worker process (or instance) can
answer `GET /<endpoint>/jobs/<id>`, whichever one runs the job.

Without a queue, jobs run one at a time in a background thread of the worker that took the
upload. With a queue (JOB_QUEUE_URL), the web tier stores the zip in S3, records the job and
sends its id to SQS; an Elastic Beanstalk worker environment receives it from the SQS daemon
(POST /worker/jobs) and runs it there (`JobRunner.run_delivered`).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from service.core import metrics
from service.core.errors import (
    ConflictError,
    EncoderUnavailableError,
    IntegrityError,
    JobCancelledError,
    JobNotFoundError,
    JobRetryError,
    ServiceError,
    StorageError,
    TrainingError,
)
from service.jobs import fanout
from service.jobs.fanout import Fanout
from service.storage import KeyNotFoundError, Storage, versions
from service.training import sharded
from service.training.results import ChangeResult, Progress, TrainResult
from service.training.sharded import cancel_key

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^[0-9a-f]{16}$")


def _runner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"  # after gunicorn's fork: this worker


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Job:
    id: str
    endpoint: str
    kind: str = "train"  # train: replace the catalog; add: add or replace items (POST /items)
    status: str = "queued"  # queued | running | succeeded | failed | cancelled
    stage: str | None = None
    done: int = 0
    total: int = 0
    version: str | None = None  # the version it publishes (named when the zip was uploaded)
    error: str | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    fine_tune: str = "auto"
    on_duplicate: str = "allow"  # a train's or add's duplicates: allow | flag | skip (training/screen.py)
    options: dict[str, Any] = field(default_factory=dict)  # a duplicate report's threshold
    evaluation: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)  # the runtime that serves its version, and why
    source: str | None = None  # s3:// URI of the zip, for jobs that run elsewhere
    attempts: int = 0
    runner: str | None = None  # host:pid of the process running it
    shards: dict[str, Any] = field(default_factory=dict)  # a sharded job's shards (fanout.describe)
    rate: float | None = None  # images embedded per second, over every worker (a sharded job)
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def record_key(job_id: str) -> str:
    return f"jobs/{job_id}.json"


class JobStore:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def save(self, job: Job) -> None:
        job.updated_at = _now()
        self.storage.write(record_key(job.id), json.dumps(job.to_dict()).encode())

    def save_unless_finished(self, job: Job) -> bool:
        """Save `job` unless its stored record has finished already (compare-and-swap on the
        record): a late shard failure or a cancel never overwrites a job another worker completed.
        False: the record was finished; nothing was written."""
        key = record_key(job.id)
        for _ in range(10):
            try:
                data, tag = self.storage.read_tagged(key)
            except KeyNotFoundError:
                data, tag = b"{}", None
            if json.loads(data).get("status") in FINISHED:
                return False
            job.updated_at = _now()
            if self.storage.write_if(key, json.dumps(job.to_dict()).encode(), tag):
                return True
        raise StorageError(f"job {job.id}: its record kept changing while it was being saved")

    def load(self, endpoint: str | None, job_id: str) -> Job:
        if not JOB_ID.match(job_id):
            raise JobNotFoundError(endpoint or "?", job_id)
        try:
            data = json.loads(self.storage.read(record_key(job_id)))
        except KeyNotFoundError:
            raise JobNotFoundError(endpoint or "?", job_id) from None
        if endpoint is not None and data.get("endpoint") != endpoint:
            raise JobNotFoundError(endpoint, job_id)
        known = {f.name for f in dataclasses.fields(Job)}
        return Job(**{k: v for k, v in data.items() if k in known})


# train(endpoint, zip, on_progress, version, fine_tune, kind, on_duplicate) -> TrainResult or ChangeResult
TrainFn = Callable[[str, Path, Callable[[Progress], None], str, str, str, str], TrainResult | ChangeResult]
# reporter(job, on_progress) -> the job's outcome (status, version, counts): a duplicate report
Reporter = Callable[["Job", Callable[[Progress], None]], dict[str, Any]]
# fetch(s3 uri, local path): download a job's zip
FetchFn = Callable[[str, Path], None]


class Queue(Protocol):
    def send(self, message: dict[str, Any]) -> None: ...


FINISHED = ("succeeded", "failed", "cancelled")
PROGRESS_TTL_S = 2.0  # how long a sharded job's summed progress is reused by a process
# work(on_progress) -> the result: what a job runs instead of a train (a sharded job's reducer)
Work = Callable[[Callable[[Progress], None]], TrainResult | ChangeResult]


class _Done(Exception):
    """The outcome is set: leave the try block."""


def _transient(exc: BaseException) -> bool:
    """Whether another attempt could succeed: the store or the encoder's source was unreachable,
    or something unexpected happened (a full disk, a killed process). Bad input never is."""
    if isinstance(exc, IntegrityError | versions.SupersededError):
        return False
    if isinstance(exc, StorageError | EncoderUnavailableError):
        return True
    return not isinstance(exc, ServiceError)


class JobRunner:
    """Creates jobs and runs them: in-process (no queue) or via the queue and the worker tier.

    The store is the record every worker reads; this process also keeps the jobs it runs in
    memory until their final status is stored, so it can answer for them while the store is down.
    """

    def __init__(
        self,
        store: JobStore,
        train: TrainFn,
        uploads_dir: Path,
        fetch: FetchFn | None = None,
        stage_upload: Callable[[str, Path], str] | None = None,
        queue: Queue | None = None,
        on_success: Callable[[str, TrainResult | ChangeResult], None] | None = None,
        fanout: Fanout | None = None,
        reporter: Reporter | None = None,
        progress_interval_s: float = 0.5,
        final_save_retry_s: float = 600,
        stale_after_s: float = 600,
    ) -> None:
        self.store = store
        self.train = train
        self.uploads_dir = uploads_dir
        self.fetch = fetch
        self.stage_upload = stage_upload
        self.queue = queue
        self.on_success = on_success  # e.g. queue a compaction the change made due
        self.fanout = fanout  # the worker tier's shards (a queue and an S3 store)
        self.reporter = reporter  # runs a duplicate report (kind "duplicates")
        self.progress_interval_s = progress_interval_s
        self.final_save_retry_s = final_save_retry_s
        self.stale_after_s = stale_after_s
        self.heartbeat_s = max(1.0, min(30.0, stale_after_s / 5))
        self.live: dict[str, Job] = {}
        self._summaries: dict[str, tuple[float, dict[str, Any]]] = {}  # job -> (when, progress)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="train")
        self._closing = threading.Event()
        if queue is None:
            threading.Thread(target=self._keep_alive, name="job-keepalive", daemon=True).start()

    # --- creating jobs ------------------------------------------------------------------------

    def submit(
        self,
        endpoint: str,
        zip_path: Path | None = None,
        source: str | None = None,
        fine_tune: str = "auto",
        kind: str = "train",
        on_duplicate: str = "allow",
        options: dict[str, Any] | None = None,
    ) -> Job:
        """Create a job for a zip on this machine (`zip_path`, deleted when done) or in S3 (`source`)."""
        # The version is named now, not when the job starts: a zip queued behind another job is
        # still older than one uploaded after it, and "the newest upload wins" (versions.publish).
        job = Job(
            id=secrets.token_hex(8),
            endpoint=endpoint,
            kind=kind,
            fine_tune=fine_tune,
            on_duplicate=on_duplicate,
            options=dict(options or {}),
            source=source,
            # A change is named when it publishes: it is built on whatever is current then.
            version=versions.new_version_id() if kind == "train" else None,
            runner=None if self.queue else _runner(),
        )
        try:
            if self.queue is not None:
                if zip_path is not None:
                    if self.stage_upload is None:
                        raise StorageError("a job queue needs S3 storage to hand zips to the worker tier")
                    job.source = self.stage_upload(f"uploads/{endpoint}/{job.id}.zip", zip_path)
                self.store.save(job)  # a store that is down refuses the job now, not silently later
                self.queue.send({"job_id": job.id, "endpoint": endpoint})
                return job
            self.store.save(job)
        finally:
            if self.queue is not None and zip_path is not None:
                zip_path.unlink(missing_ok=True)
        with self._lock:
            self.live[job.id] = job
        self._pool.submit(self._run_local, job, zip_path)
        return job

    def status(self, endpoint: str, job_id: str) -> Job:
        """A job's status: this process's own copy while it has one, else the stored record."""
        with self._lock:
            job = self.live.get(job_id)
            if job is not None and job.endpoint == endpoint:
                return Job(**job.to_dict())
        job = self.store.load(endpoint, job_id)
        if job.shards and job.status == "running" and job.stage == "embed":
            self._shard_progress(job)
        if self.queue is None and self._silent(job):
            # Its process died (killed, out of memory, instance gone): say so, and record it.
            # (With a queue, SQS redelivers the job or dead-letters it; the worker decides.)
            age = time.time() - datetime.fromisoformat(job.updated_at).timestamp()
            job.status = "failed"
            job.error = f"the process running this job stopped: no progress for {age:.0f}s"
            try:
                self.store.save(job)
            except Exception as exc:
                log.warning("could not record stale job %s: %s", job.id, exc)
        return job

    def _shard_progress(self, job: Job) -> None:
        """A sharded job's progress, summed over the workers embedding its shards; computed at
        most every PROGRESS_TTL_S per job and process (a page polls several times a second)."""
        try:
            done = sharded.done_shards(self.store.storage, job.id)  # one LIST
        except Exception as exc:  # progress is best effort
            log.warning("could not read the progress of job %s: %s", job.id, exc)
            return
        with self._lock:
            cached = self._summaries.get(job.id)
        if (
            cached is None
            or time.monotonic() - cached[0] > PROGRESS_TTL_S
            or cached[1]["shards"]["done"] != len(done)
        ):
            try:
                fresh = sharded.summary(
                    self.store.storage, job.id, job.shards["sizes"], done, job.shards["started"]
                )
            except Exception as exc:  # progress is best effort
                log.warning("could not read the progress of job %s: %s", job.id, exc)
                return
            cached = (time.monotonic(), fresh)
            with self._lock:
                if len(self._summaries) > 1000:
                    self._summaries.clear()
                self._summaries[job.id] = cached
        summary = cached[1]
        job.shards = {**job.shards, "done": summary["shards"]["done"]}
        job.done, job.total = summary["images"]["done"], summary["images"]["total"]
        job.rate = summary["rate"]

    def cancel(self, endpoint: str, job_id: str) -> Job:
        """Cancel a job: a queued one never runs; a running one stops at its next progress report
        (a shard at its next batch) and publishes nothing; one that is publishing finishes."""
        job = self.status(endpoint, job_id)
        if job.status in FINISHED:
            raise ConflictError(f"job {job_id} has {job.status} already; there is nothing to cancel")
        self.store.storage.write(cancel_key(job_id), b"")
        with self._lock:
            live = self.live.get(job_id)
            if live is not None and live.status == "queued":
                live.status, live.error = "cancelled", "cancelled before it started"
        if job.status == "queued" or (job.shards and job.stage == "embed"):
            job.status, job.error = "cancelled", "cancelled; nothing was published"
            if not self.store.save_unless_finished(job):
                job = self.store.load(endpoint, job_id)  # it finished meanwhile: say how
        return job

    def _cancelled(self, job: Job) -> bool:
        try:
            return self.store.storage.exists(cancel_key(job.id))
        except Exception:
            return False  # the store is down: the job finds out at its next report

    def _silent(self, job: Job) -> bool:
        """Queued or running, with no heartbeat for `stale_after_s`: its process is gone."""
        age = time.time() - datetime.fromisoformat(job.updated_at).timestamp()
        return job.status in ("queued", "running") and age > self.stale_after_s

    def _keep_alive(self) -> None:
        """Heartbeat for jobs waiting in this process's queue (running ones beat on their own)."""
        while not self._closing.wait(self.heartbeat_s):
            with self._lock:
                waiting = [job for job in self.live.values() if job.status == "queued"]
            for job in waiting:
                self._save(job)

    # --- running them --------------------------------------------------------------------------

    def _run_local(self, job: Job, zip_path: Path | None) -> None:
        if job.status == "cancelled":  # while it waited in this process's queue
            if zip_path is not None:
                zip_path.unlink(missing_ok=True)
            self._store_final(job)
            return
        try:
            self._execute(job, zip_path)
        finally:
            self._store_final(job)

    def run_delivered(self, job_id: str, attempt: int, max_attempts: int, shard: int | None = None) -> bool:
        """Run a job (or one of its shards) delivered by the queue (worker tier). True when the
        message is done with (finished, succeeded or failed for good); False when this attempt
        failed in a way worth retrying."""
        job = self.store.load(None, job_id)
        if job.status in FINISHED:  # a redelivered message of a finished job, or a pending shard
            if shard is not None and job.status != "succeeded":
                self._clean_up(job.id)  # of a failed or cancelled one: what it left goes
            return True
        if self._cancelled(job):
            self._mark_cancelled(job)
            return True
        if shard is not None:
            return self._run_shard(job, shard, attempt, max_attempts)
        if job.shards and self.fanout is not None:  # planned already: queue its shards again
            shard_plan = sharded.ShardPlan.read(self.store.storage, job.id)
            if shard_plan is not None:
                self.fanout.send(shard_plan)
            return True
        if job.status == "running" and not self._silent(job):
            # Still running somewhere (its heartbeat is fresh): never train one job twice at once.
            raise JobRetryError(f"job {job.id} is still running on {job.runner}")
        job.attempts = attempt
        with self._lock:
            self.live[job.id] = job
        handed = False
        try:
            retry = self._execute(job, None, plan=self.fanout is not None)
            handed = job.status == "running" and bool(job.shards)
            if handed:
                return True  # the message is done: the shards' messages carry the job on
            if retry and attempt < max_attempts:
                job.status, job.stage = "queued", None
                job.error = f"attempt {attempt} of {max_attempts} failed, will retry: {job.error}"
                return False
            if retry:
                job.error = f"gave up after {attempt} attempts: {job.error}"
            return not retry
        finally:
            if handed:
                with self._lock:
                    self.live.pop(job.id, None)
            else:
                self._store_final(job)

    def _execute(self, job: Job, zip_path: Path | None, plan: bool = False, work: Work | None = None) -> bool:
        """Run the training and record the outcome on `job`; True if a retry might succeed.
        `plan`: first try to split it into shards for the worker tier (the shards go on from there);
        `work`: run this instead (a sharded job's reducer)."""
        job.status, job.error, job.runner = "running", None, _runner()
        job_started = time.monotonic()
        self._save(job)
        last_save = 0.0
        beating = threading.Event()

        def heartbeat() -> None:  # long steps (an index build, head training) report no progress
            while not beating.wait(self.heartbeat_s):
                self._save(job)

        beat = threading.Thread(target=heartbeat, name=f"heartbeat-{job.id}", daemon=True)
        beat.start()

        def on_progress(p: Progress) -> None:
            nonlocal last_save
            with self._lock:
                changed_stage = p.stage != job.stage
                job.stage, job.done, job.total = p.stage, p.done, p.total
            if changed_stage or time.monotonic() - last_save >= self.progress_interval_s:
                last_save = time.monotonic()
                # Once it publishes, a job finishes: a cancel could land on either side of CURRENT.
                if p.stage != "publish" and self._cancelled(job):
                    raise JobCancelledError(job.id)
                self._save(job)

        retry = False
        fetched: Path | None = None
        shard_plan: sharded.ShardPlan | None = None
        try:
            if work is not None:
                result = work(on_progress)
                outcome = self._outcome(result)
                raise _Done
            if plan and job.source is not None and self.fanout is not None:
                planned = self.fanout.plan(
                    job.id,
                    job.endpoint,
                    job.kind,
                    job.source,
                    job.version,
                    job.fine_tune,
                    on_progress,
                    job.on_duplicate,
                )
                if planned is not None:  # handed to the shards once stored (below)
                    shard_plan = planned
                    outcome = {"status": "running", "stage": "embed", "done": 0, "total": planned.images}
                    outcome["shards"] = fanout.describe(planned)
                    raise _Done
            if job.kind == "duplicates":  # a report reads the served version only
                if self.reporter is None:
                    raise TrainingError("this instance does not run duplicate reports")
                outcome = self.reporter(job, on_progress)
                raise _Done
            if zip_path is None and job.kind != "compact":  # a compaction reads the store only
                if job.source is None or self.fetch is None:
                    raise TrainingError("the job has no zip to train from")
                on_progress(Progress("download", 0, 1))
                fd, name = tempfile.mkstemp(dir=self.uploads_dir, prefix=f"{os.getpid()}-", suffix=".zip")
                os.close(fd)
                fetched = zip_path = Path(name)
                self.fetch(job.source, zip_path)
            result = self.train(
                job.endpoint,
                zip_path,  # type: ignore[arg-type]  # None only for a compaction
                on_progress,
                job.version or versions.new_version_id(),
                job.fine_tune,
                job.kind,
                job.on_duplicate,
            )
            outcome = self._outcome(result)
        except _Done:
            pass
        except JobCancelledError as exc:
            outcome = {"status": "cancelled", "error": exc.message}
        except TrainingError as exc:
            outcome = {
                "status": "failed",
                "error": exc.message,
                "skipped": [{"name": s.name, "reason": s.reason} for s in exc.skipped],
            }
        except ServiceError as exc:
            retry = _transient(exc)
            outcome = {"status": "failed", "error": exc.message}
        except OSError as exc:  # the machine, not the input: another attempt (elsewhere) may work
            retry = True
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            reason = "the disk is full" if full else f"{type(exc).__name__}"
            log.error("training job %s failed: %s", job.id, exc)
            outcome = {"status": "failed", "error": f"{reason} ({exc.strerror or exc})"}
        except Exception as exc:  # a bug: details in the log, a summary for the client
            log.exception("training job %s failed", job.id)
            retry = True
            outcome = {"status": "failed", "error": f"internal error ({type(exc).__name__}: {exc})"}
        finally:
            beating.set()
            beat.join()  # no heartbeat save may land after the final status
            for path in (zip_path, fetched):
                if path is not None:
                    path.unlink(missing_ok=True)
        with self._lock:
            for name, value in outcome.items():
                setattr(job, name, value)
        if shard_plan is not None:  # planned into shards: the record first, then the shards
            return self._hand_over(job, shard_plan)
        if outcome["status"] == "succeeded" and job.kind != "duplicates":
            self._succeeded(job.endpoint, result)
        metrics.JOBS.labels(job.kind, outcome["status"]).inc()
        metrics.JOB_SECONDS.labels(job.kind).observe(time.monotonic() - job_started)
        log.info("job %s for %s %s %s", job.id, job.endpoint, job.status, job.error or job.version)
        return retry

    def _hand_over(self, job: Job, shard_plan: sharded.ShardPlan) -> bool:
        """Store a planned job's record, then queue its shards (whose reducer may finish the job
        before this returns: nothing here writes the record after the shards are sent)."""
        assert self.fanout is not None
        try:
            self.store.save(job)
            self.fanout.send(shard_plan)
        except Exception as exc:
            job.status, job.error = "queued", f"could not queue the job's shards: {exc}"
            return True
        log.info("job %s for %s: %d shards queued", job.id, job.endpoint, len(shard_plan.ranges))
        return False

    @staticmethod
    def _outcome(result: TrainResult | ChangeResult) -> dict[str, Any]:
        return {
            "status": "succeeded",
            "version": result.version,
            "evaluation": result.evaluation,
            "runtime": result.runtime,
            "counts": result.counts,
            "skipped": [{"name": s.name, "reason": s.reason} for s in result.skipped],
        }

    # --- shards (the worker tier) ----------------------------------------------------------------

    def _run_shard(self, job: Job, shard: int, attempt: int, max_attempts: int) -> bool:
        """Embed one shard; the last one stored starts the reducer. True: the message is done."""
        assert self.fanout is not None
        shard_plan = sharded.ShardPlan.read(self.store.storage, job.id)
        if shard_plan is None or not 0 <= shard < len(shard_plan.ranges):
            log.warning("job %s has no shard %s: message dropped", job.id, shard)
            return True
        if self._overdue(job, shard_plan):
            return True
        try:
            self.fanout.embed(shard_plan, shard)
        except JobCancelledError:
            self._mark_cancelled(job)
            return True
        except Exception as exc:
            retry = _transient(exc) or isinstance(exc, OSError)
            error = exc.message if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
            if retry and attempt < max_attempts:
                log.warning(
                    "job %s shard %d attempt %d failed, will retry: %s", job.id, shard, attempt, error
                )
                return False
            if not isinstance(exc, ServiceError):
                log.error("job %s shard %d failed", job.id, shard, exc_info=exc)
            how = f"after {attempt} attempts" if retry else "for good"
            job.status, job.stage = "failed", None
            job.error = f"shard {shard} ({shard_plan.members(shard)}) failed {how}: {error}"
            if self._reducing(job.id) or not self.store.save_unless_finished(job):
                return True  # another delivery of this shard stored it, and the job goes on
            self.fanout.finish(shard_plan)
            return not retry  # a retryable failure on its last attempt: to the dead-letter queue
        if self.store.load(None, job.id).status in FINISHED:  # failed or cancelled meanwhile
            self.fanout.finish(shard_plan)  # what this shard wrote goes too
            return True
        if len(sharded.done_shards(self.store.storage, job.id)) < len(shard_plan.ranges):
            return True
        return self._reduce(job, shard_plan, attempt, max_attempts)

    def _reduce(self, job: Job, shard_plan: sharded.ShardPlan, attempt: int, max_attempts: int) -> bool:
        """Run the job's reducer if this delivery claims it: exactly one per job (a conditional
        write), or the one that takes over from a reducer whose heartbeat stopped."""
        assert self.fanout is not None
        storage = self.store.storage
        if not sharded.claim_reducer(storage, job.id, _runner()):
            job = self.store.load(None, job.id)
            claim = sharded.reducer_claim(storage, job.id)
            if job.status in FINISHED or claim is None:
                return True  # another worker reduced it
            claimed_at, tag = claim
            if time.time() - claimed_at <= self.stale_after_s or not self._silent(job):
                # Another worker reduces (claimed lately, or its job record beats). This message
                # stays (delivered again later) while attempts remain: if that worker dies, it
                # takes over.
                return attempt >= max_attempts
            if not sharded.claim_reducer(storage, job.id, _runner(), tag):
                return attempt >= max_attempts  # another delivery took it over first
            log.warning(
                "job %s: its reducer stopped (no heartbeat for %.0f s); taking over",
                job.id,
                self.stale_after_s,
            )
        if self._overdue(job, shard_plan):
            return True
        log.info("job %s: all %d shards stored, reducer claimed", job.id, len(shard_plan.ranges))
        job.attempts = attempt
        with self._lock:
            self.live[job.id] = job
        try:
            job.stage = "reduce"
            fan = self.fanout
            retry = self._execute(job, None, work=lambda report: fan.reduce(shard_plan, report))
            if retry and attempt < max_attempts:
                storage.delete(sharded.reducer_key(job.id))  # the next delivery reduces
                job.status, job.stage = "running", "reduce"
                job.error = f"the reducer's attempt {attempt} failed, will retry: {job.error}"
                return False
            self.fanout.finish(shard_plan)
            return not retry
        finally:
            self._store_final(job)

    def _overdue(self, job: Job, shard_plan: sharded.ShardPlan) -> bool:
        """Fail a sharded job past JOB_MAX_S since it was planned (its lease, which keeps garbage
        collection off the originals its shards uploaded, ends then): nothing is published."""
        assert self.fanout is not None
        limit = self.fanout.settings.job_max_s
        if time.time() <= shard_plan.created + limit:
            return False
        if self._reducing(job.id):
            return True  # its reducer started in time and decides; this message is done
        job.status, job.stage = "failed", None
        job.error = f"the job ran over its time limit (JOB_MAX_S={limit:g} s); nothing was published"
        self.store.save_unless_finished(job)
        self.fanout.finish(shard_plan)
        return True

    def _reducing(self, job_id: str) -> bool:
        """Whether a reducer has claimed the job: from then on it alone finishes the job (it stops
        itself on a cancel, before it publishes), and no shard message fails or cleans it up."""
        return self.fanout is not None and sharded.reducer_claim(self.store.storage, job_id) is not None

    def _mark_cancelled(self, job: Job) -> None:
        if self._reducing(job.id):
            return  # the reducer sees the cancel at its next report, or has published already
        job.status, job.error = "cancelled", job.error or "cancelled; nothing was published"
        if self.store.save_unless_finished(job):
            with self._lock:
                self.live.pop(job.id, None)
        self._clean_up(job.id)

    def _clean_up(self, job_id: str) -> None:
        """Remove a finished sharded job's work files, lease and cancel marker (idempotent)."""
        shard_plan = sharded.ShardPlan.read(self.store.storage, job_id) if self.fanout else None
        if shard_plan is not None and self.fanout is not None:
            self.fanout.finish(shard_plan)

    def _succeeded(self, endpoint: str, result: TrainResult | ChangeResult) -> None:
        if self.on_success is None:
            return
        try:
            self.on_success(endpoint, result)
        except Exception as exc:  # what follows a job never fails it
            log.warning("after a job for %s: %s", endpoint, exc)

    def compacting(self, endpoint: str) -> bool:
        """Whether this process has a compaction of `endpoint` queued or running."""
        with self._lock:
            return any(j.endpoint == endpoint and j.kind == "compact" for j in self.live.values())

    def _save(self, job: Job) -> None:
        with self._lock:
            snapshot = Job(**job.to_dict())
        try:
            self.store.save(snapshot)
        except Exception as exc:  # progress is best effort; the final status is retried
            log.warning("could not save the status of job %s: %s", job.id, exc)

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
