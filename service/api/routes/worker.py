"""The worker tier: the SQS daemon on a worker instance posts each queued training job here."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flask import request
from marshmallow import EXCLUDE

from service.api.context import svc
from service.api.rules import Blueprint, error_responses
from service.api.schemas import WorkerMessageSchema, WorkerResultSchema
from service.application.results import WorkerOutcome
from service.core.errors import ForbiddenError, InvalidParameterError, NotFoundError

blp = Blueprint("worker", __name__, url_prefix="/", description="The worker tier (SQS daemon only)")
LOOPBACK = ("127.0.0.1", "::1")


def from_sqs_daemon(view: Callable[..., Any]) -> Callable[..., Any]:
    """Only on a worker instance (else 404), only from its SQS daemon on loopback (else 403);
    checked before the body is read."""

    @functools.wraps(view)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if svc().settings.service_role != "worker":
            raise NotFoundError("this instance is not a worker (SERVICE_ROLE=worker)")
        forwarded = [a.strip() for a in request.headers.get("X-Forwarded-For", "").split(",") if a.strip()]
        from_daemon = request.user_agent.string.startswith("aws-sqsd")
        if (
            request.remote_addr not in LOOPBACK
            or any(a not in LOOPBACK for a in forwarded)
            or not from_daemon
        ):
            raise ForbiddenError("only the SQS daemon on this instance delivers jobs")
        return view(*args, **kwargs)

    return checked


@blp.route("/worker/jobs", methods=["POST"])
@blp.response(200, WorkerResultSchema)
@blp.doc(responses=error_responses(403, 404, 413, 422, 503))
@from_sqs_daemon
@blp.arguments(WorkerMessageSchema, location="json", unknown=EXCLUDE)
def worker_job(message: dict[str, Any]) -> WorkerOutcome:
    """Run a queued training job (worker tier only; the SQS daemon on this instance posts here)"""
    count = request.headers.get("X-Aws-Sqsd-Receive-Count", "1").strip() or "1"
    if not (count.isascii() and count.isdigit()) or not 1 <= int(count) <= 10_000:
        raise InvalidParameterError("X-Aws-Sqsd-Receive-Count must be a positive whole number")
    return svc().run_delivered_job(message["job_id"], int(count), message.get("shard"))
