"""The service and its endpoints: health, the list of endpoints, one endpoint's status."""

from __future__ import annotations

import os
from typing import Any

from flask import Response, request
from flask_smorest import Blueprint
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.common import endpoint, error_responses, svc, tokens
from service.api.schemas import EndpointListSchema, EndpointSchema, HealthSchema
from service.core import metrics

blp = Blueprint("endpoints", __name__, url_prefix="/", description="The service and its endpoints")


@blp.route("/health")
@blp.response(200, HealthSchema)
def health() -> dict[str, Any]:
    """Liveness: answers at once, even while models load (details only for whoever may query)"""
    if tokens().query and not tokens().allows_query(request.headers.get("Authorization")):
        return {"status": "ok"}
    return {"status": "ok", "worker": os.getpid(), "endpoints": svc().registry.versions_served()}


@blp.route("/endpoints")
@blp.response(200, EndpointListSchema)
def list_endpoints() -> dict[str, Any]:
    """Every endpoint with its served version"""
    tokens().require_query(request.headers.get("Authorization"), None)
    return {"endpoints": [r.status() for r in svc().registry.endpoints.values()]}


@blp.route("/<name>")
@blp.response(200, EndpointSchema)
@blp.doc(responses=error_responses(404))
def endpoint_info(name: str) -> dict[str, Any]:
    """An endpoint: served version, item count, labels, encoder, trained time"""
    return endpoint(name).status()


@blp.route("/metrics")
@blp.doc(
    responses={
        "200": {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **error_responses(401, 403),
    }
)
def prometheus_metrics() -> Response:
    """Prometheus metrics of every worker (protected like queries when QUERY_TOKEN is set)"""
    tokens().require_query(request.headers.get("Authorization"), None)
    return Response(metrics.exposition(), mimetype=CONTENT_TYPE_LATEST)
