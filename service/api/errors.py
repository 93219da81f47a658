"""One JSON shape for every error: domain errors, Werkzeug's HTTP errors and anything unexpected."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from flask import Flask, request
from werkzeug.exceptions import HTTPException

from service.api.bodies import MB, body_was_cut
from service.core.errors import ServiceError

log = logging.getLogger(__name__)


def register_error_handlers(app: Flask) -> None:
    """Every error answers {"code", "status", "message", "errors"?}; tracebacks go to the log only."""

    def payload(code: int, message: str, errors: Any = None) -> tuple[dict[str, Any], int]:
        body: dict[str, Any] = {"code": code, "status": HTTPStatus(code).phrase, "message": message}
        if errors:
            body["errors"] = errors
        return body, code

    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError) -> tuple[dict[str, Any], int, dict[str, str]]:
        if exc.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, exc.message)
        body, code = payload(exc.status, exc.message, exc.errors)
        return body, code, exc.headers()

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[dict[str, Any], int]:
        data = getattr(exc, "data", None) or {}  # webargs puts validation errors here
        errors = data.get("errors") or data.get("messages")
        code = exc.code or 500
        limit, length = request.max_content_length, request.content_length
        if code in (400, 422) and body_was_cut():  # a chunked body over the limit, cut short
            code, errors = 413, None
        if code == 413 and length is not None and limit and length <= limit:
            message = f"too many parts in the multipart form (limit {request.max_form_parts})"
        elif code == 413:
            message = "request body too large"
            if limit:
                message += f" (limit {limit // MB} MB for this route)"
        elif code == 422 and errors:
            message = "invalid parameters"
        else:
            message = data.get("message") or exc.description or HTTPStatus(code).phrase
        return payload(code, message, errors)

    @app.errorhandler(TimeoutError)
    def slow_body(exc: TimeoutError) -> tuple[dict[str, Any], int]:
        # The server gives a request body a time to arrive (service/server/worker.py).
        return payload(408, str(exc) or "the request body arrived too slowly")

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[dict[str, Any], int]:
        # The client gets a safe, stable message.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return payload(500, "internal error; the server log has the details")
