"""The worker tier's part in sharded jobs: plan a delivered job into shard messages on the job
queue, embed the shards delivered, and run the one reducer once the last shard is stored.

Elastic Beanstalk's SQS daemon is the scheduler: a shard is a message, a worker killed mid-shard
lets its message come back after the visibility timeout, a shard that keeps failing goes to the
dead-letter queue after MaxRetries. Planning and reducing need TensorFlow (conversion, the head)
and run in a job child process; embedding a shard runs on the version's converted encoder and
needs none, so it runs in the worker's own thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from service.core.config import Settings
from service.core.endpoint import EndpointSpec
from service.core.errors import TrainingError
from service.storage import Storage, blobs, open_storage
from service.training import changes, sharded
from service.training.results import ChangeResult, Progress, ProgressFn, TrainResult
from service.training.sharded import ShardPlan
from service.training.train import train

log = logging.getLogger(__name__)

Result = TrainResult | ChangeResult
# run(fn, spec, on_progress, *args): fn(settings, spec, *args) where TensorFlow may load (a child)
Isolate = Callable[..., Any]


class Sender(Protocol):
    def send_many(self, messages: list[dict[str, Any]]) -> None: ...


def job_lease_key(endpoint: str, job: str, expires: float) -> str:
    """A lease that keeps garbage collection off the blobs a sharded job's workers upload until its
    reducer publishes (or JOB_MAX_S passes): no single process holds the job from start to end."""
    return f"{endpoint}/{blobs.LEASES}{expires:.3f}-job-{job}"


class Fanout:
    """Plans, shards and reducers of one worker process, over the store and the job queue."""

    def __init__(
        self,
        storage: Storage,
        settings: Settings,
        specs: dict[str, EndpointSpec],
        queue: Sender,
        isolate: Isolate,
    ) -> None:
        self.storage, self.settings, self.specs = storage, settings, specs
        self.queue = queue
        self.isolate = isolate

    def plan(self, job_id: str, endpoint: str, kind: str, source: str, version: str | None,
             fine_tune: str, report: ProgressFn,
             on_duplicate: str = "allow") -> ShardPlan | None:  # fmt: skip
        """The job's shards (planned once), or None: it runs on one worker."""
        bucket = self.storage.as_bucket()
        key = bucket.bucket_key(source) if bucket is not None else None
        if key is None or kind not in sharded.KINDS:
            return None
        planned = ShardPlan.read(self.storage, job_id)
        if planned is not None:  # a redelivered job message: its lease again (the same key)
            self.storage.write(
                job_lease_key(endpoint, job_id, planned.created + self.settings.job_max_s), b""
            )
            return planned
        if sharded.candidates(self.storage, self.settings, key) <= self.settings.shard_images:
            return None  # one worker's job: decided here, no process started to plan it
        # The lease first: planning uploads the converted encoder, and the shards their originals.
        created = time.time()
        lease = job_lease_key(endpoint, job_id, created + self.settings.job_max_s)
        self.storage.write(lease, b"")
        spec = self.specs[endpoint]
        args = (job_id, kind, key, version, fine_tune, created, report, on_duplicate)
        try:
            # A train converts and checks the encoder (TensorFlow, in a child); an add plans on
            # the current version's converted encoder, here.
            planned = (
                self.isolate(plan_work, spec, report, *args)
                if kind == "train"
                else plan_work(self.settings, spec, *args)
            )
        except BaseException:
            stored = ShardPlan.read(self.storage, job_id)
            if stored is None or stored.created != created:  # no plan of ours survives it
                self.storage.delete(lease)
            raise
        if planned is None or planned.created != created:  # one worker; or planned by another delivery
            self.storage.delete(lease)
        return planned

    def send(self, shard_plan: ShardPlan) -> None:
        """One message per shard on the job queue (again on a redelivered job: shards are idempotent)."""
        self.queue.send_many(
            [
                {"job_id": shard_plan.job, "endpoint": shard_plan.endpoint, "shard": i}
                for i in range(len(shard_plan.ranges))
            ]
        )

    def embed(self, shard_plan: ShardPlan, shard: int) -> bool:
        """Embed one shard here (no TensorFlow); False if its result was stored already."""
        start, end = shard_plan.ranges[shard]
        report = sharded.progress_reporter(self.storage, shard_plan.job, shard, end - start)
        spec = self.specs[shard_plan.endpoint]
        return sharded.embed_shard(spec, self.storage, self.settings, shard_plan, shard, report)

    def reduce(self, shard_plan: ShardPlan, report: ProgressFn) -> Result:
        """Fine-tune, index and publish from every shard's result: in a child when a head is
        trained (TensorFlow), else here (no process to start, no TensorFlow to load)."""
        spec = self.specs[shard_plan.endpoint]
        if not shard_plan.head:
            return reduce_work(self.settings, spec, shard_plan.job, report)
        result: Result = self.isolate(reduce_work, spec, report, shard_plan.job, report)
        return result

    def finish(self, shard_plan: ShardPlan) -> None:
        """Drop a finished job's work files and its lease (best effort: a sweep may remove them)."""
        try:
            self.storage.delete_prefix(sharded.job_prefix(shard_plan.job))
            expires = shard_plan.created + self.settings.job_max_s
            self.storage.delete(job_lease_key(shard_plan.endpoint, shard_plan.job, expires))
            # (The cancel marker stays, like the job's record: shards still at work stop on it.)
        except Exception as exc:
            log.warning("could not clean up after job %s: %s", shard_plan.job, exc)


def _storage(settings: Settings) -> Storage:
    return open_storage(
        settings.storage_uri, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
    )


def plan_work(
    settings: Settings,
    spec: EndpointSpec,
    job_id: str,
    kind: str,
    source: str,
    version: str | None,
    fine_tune: str,
    created: float,
    report: ProgressFn,
    on_duplicate: str = "allow",
) -> ShardPlan | None:
    """Where TensorFlow may load: plan the job (module level: a child process runs it)."""
    storage = _storage(settings)
    return sharded.plan(
        spec, storage, settings, job_id, kind, source, version, fine_tune, created, report, on_duplicate
    )


def reduce_work(settings: Settings, spec: EndpointSpec, job_id: str, report: ProgressFn) -> Result:
    """Where TensorFlow may load: gather the shards and run the job's remaining steps."""
    storage = _storage(settings)
    shard_plan = ShardPlan.read(storage, job_id)
    if shard_plan is None:
        raise RuntimeError(f"job {job_id} has no plan in the store")
    # A lease before anything else: the job's own lease may end while this runs, and garbage
    # collection must not take the shards' originals before the build's own lease (in train or
    # add) starts. Past JOB_MAX_S it may have already: publish nothing then.
    with blobs.lease(storage, spec.name):
        if time.time() > shard_plan.created + settings.job_max_s:
            raise TrainingError(
                f"the job ran over its time limit (JOB_MAX_S={settings.job_max_s:g} s); nothing was published"
            )
        return _finish_job(spec, storage, settings, shard_plan, report)


def _finish_job(
    spec: EndpointSpec, storage: Storage, settings: Settings, shard_plan: ShardPlan, report: ProgressFn
) -> Result:
    report(Progress("gather", 0, len(shard_plan.ranges)))
    gathered = sharded.gather(spec, storage, settings, shard_plan)
    report(Progress("gather", len(shard_plan.ranges), len(shard_plan.ranges)))
    if shard_plan.kind == "add":
        return changes.add_items(
            spec,
            None,
            storage,
            settings,
            report,
            shard_plan.fine_tune,
            True,
            gathered,
            shard_plan.on_duplicate,
        )
    return train(
        spec,
        None,
        storage,
        settings,
        report,
        shard_plan.version,
        shard_plan.fine_tune,
        gathered,
        shard_plan.on_duplicate,
    )


def describe(shard_plan: ShardPlan) -> dict[str, Any]:
    """What a job's status says of its shards (their sizes sum its images)."""
    return {
        "total": len(shard_plan.ranges),
        "sizes": [end - start for start, end in shard_plan.ranges],
        "started": shard_plan.created,
    }
