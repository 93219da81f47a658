"""The service and its endpoints: health, the list of endpoints, one endpoint's status, metrics."""

from __future__ import annotations

from typing import Any

from flask import Response, request
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.context import svc, tokens
from service.api.rules import Blueprint, error_responses, requires
from service.api.schemas import EndpointListSchema, EndpointSchema, HealthSchema
from service.application.results import Health
from service.core import metrics

blp = Blueprint("endpoints", __name__, url_prefix="/", description="The service and its endpoints")


@blp.route("/health")
@blp.response(200, HealthSchema)
def health() -> Health:
    """Liveness: answers at once, even while models load (details only for whoever may query)"""
    return svc().health(details=tokens().allows_query(request.headers.get("Authorization")))


@blp.route("/endpoints")
@requires("query")
@blp.response(200, EndpointListSchema)
def list_endpoints() -> dict[str, Any]:
    """Every endpoint with its served version"""
    return {"endpoints": svc().endpoints_status()}


@blp.route("/<endpoint:name>")
@requires("query")
@blp.response(200, EndpointSchema)
@blp.doc(responses=error_responses(404))
def endpoint_info(name: str) -> dict[str, Any]:
    """An endpoint: served version, item count, labels, encoder, trained time"""
    return svc().endpoint_status(name)


@blp.route("/metrics")
@requires("query")
@blp.doc(
    responses={
        "200": {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    }
)
def prometheus_metrics() -> Response:
    """Prometheus metrics of every worker (protected like queries when QUERY_TOKEN is set)"""
    return Response(metrics.exposition(), content_type=CONTENT_TYPE_LATEST)  # it names its charset
