"""The worker tier: the SQS daemon on a worker instance posts each queued training job here."""

from __future__ import annotations

from typing import Any

from flask import request
from flask_smorest import Blueprint

from service.api.common import error_responses, json_body, load_body, svc
from service.api.schemas import WorkerMessageSchema, WorkerResultSchema
from service.core.errors import ForbiddenError, InvalidParameterError, JobRetryError, NotFoundError

blp = Blueprint("worker", __name__, url_prefix="/", description="The worker tier (SQS daemon only)")
LOOPBACK = ("127.0.0.1", "::1")


@blp.route("/worker/jobs", methods=["POST"])
@blp.response(200, WorkerResultSchema)
@blp.doc(responses=error_responses(403, 404, 422, 503))
def worker_job() -> dict[str, Any]:
    """Run a queued training job (worker tier only; the SQS daemon on this instance posts here)"""
    service = svc()
    if service.settings.service_role != "worker":
        raise NotFoundError("this instance is not a worker (SERVICE_ROLE=worker)")
    forwarded = [a.strip() for a in request.headers.get("X-Forwarded-For", "").split(",") if a.strip()]
    from_daemon = request.user_agent.string.startswith("aws-sqsd")
    if request.remote_addr not in LOOPBACK or any(a not in LOOPBACK for a in forwarded) or not from_daemon:
        raise ForbiddenError("only the SQS daemon on this instance delivers jobs")
    message = load_body(WorkerMessageSchema(), json_body())
    count = request.headers.get("X-Aws-Sqsd-Receive-Count", "1").strip() or "1"
    if not (count.isascii() and count.isdigit()) or not 1 <= int(count) <= 10_000:
        raise InvalidParameterError("X-Aws-Sqsd-Receive-Count must be a positive whole number")
    attempt = int(count)
    finished = service.jobs.run_delivered(message["job_id"], attempt, service.settings.job_max_attempts)
    job = service.jobs.store.load(None, message["job_id"])
    if not finished:
        raise JobRetryError(f"job {job.id}: {job.error}")
    return {"job_id": job.id, "status": job.status, "error": job.error}
