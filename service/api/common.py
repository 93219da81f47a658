"""What every route shares: the service's parts, the token checks, body parsing, OpenAPI helpers."""

from __future__ import annotations

import errno
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

from flask import current_app, request, url_for
from flask_smorest.error_handler import ErrorSchema  # {code, status, message, errors}
from marshmallow import EXCLUDE, Schema, ValidationError

from service.api.auth import Tokens
from service.core.errors import (
    InsufficientStorageError,
    InvalidParameterError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from service.serving import query
from service.serving.registry import EndpointRuntime, LoadedVersion
from service.serving.runtime import Service
from service.storage import versions

MB = 1024 * 1024
SMALL_BODY = 1 * MB
# The routes that take an upload; every other route reads at most SMALL_BODY.
BIG_BODY_ROUTES = {"training.train", "training.train_any", "queries.infer", "items.add_items"}


def svc() -> Service:
    return current_app.extensions["simsvc"]


def tokens() -> Tokens:
    return current_app.extensions["simsvc.tokens"]


def cap_small_bodies() -> None:
    """Routes that take no upload take at most 1 MB, so nobody makes a worker read a big body."""
    if request.endpoint not in BIG_BODY_ROUTES:
        request.max_content_length = SMALL_BODY


def endpoint(name: str, write: bool = False) -> EndpointRuntime:
    """The named endpoint, once the request's token allows the action: the token is checked
    first, so an unknown name answers like a known one (401/403) to a caller without one."""
    header = request.headers.get("Authorization")
    if write:
        tokens().require_write(header, name)
    else:
        tokens().require_query(header, name)
    return svc().registry.get(name)


def body_was_cut() -> bool:
    """Werkzeug stops reading a chunked body (no Content-Length) at the route's limit without a
    word; after reading it, look for one more byte: a body over the limit must be a 413."""
    if request.content_length is not None or not request.max_content_length:
        return False
    stream = request.environ.get("wsgi.input")
    try:
        return bool(stream is not None and stream.read(1))
    except (OSError, ValueError):
        return False


def require_whole_body() -> None:
    if body_was_cut():
        raise PayloadTooLargeError(
            f"request body too large (limit {request.max_content_length // MB} MB for this route)"
        )


def save_upload(write: Callable[[Path], object], path: Path) -> None:
    """Write an upload to this instance's disk; a full disk is a 507 the client can retry."""
    try:
        write(path)
    except OSError as exc:
        path.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise InsufficientStorageError(
                "this instance's disk is full; the upload was not kept (try again later)"
            ) from None
        raise


def json_body() -> Any:
    """The request's JSON body (None if it is not JSON); absurd nesting is a 422, not a 500."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        raise InvalidParameterError("the JSON body is nested too deeply") from None


def load_body(schema: Schema, data: Any) -> dict[str, Any]:
    """Validate a body with a marshmallow schema; 422 with the field errors if it does not fit."""
    if not isinstance(data, dict):
        raise InvalidParameterError("the body must be a JSON object")
    try:
        return schema.load(data, unknown=EXCLUDE)
    except ValidationError as exc:
        raise InvalidParameterError("invalid parameters", errors=exc.normalized_messages()) from None


def require_multipart(what: str) -> None:
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaTypeError(
            f"send multipart/form-data with {what}, not {request.mimetype or 'no content type'!r}"
        )


def image_url(name: str) -> query.ImageUrlFn:
    """Pre-signed store URLs where the store gives them (S3), else this service's image route."""
    service = svc()
    # One url_for per request, not per result: the route differs only in the id.
    base = url_for("queries.item_image", name=name, item_id=0, _external=True).removesuffix("/items/0/image")

    def build(loaded: LoadedVersion, item_id: int, photo: int, item: dict[str, Any]) -> str:
        key = versions.version_prefix(name, loaded.version) + item["image"]
        signed = service.storage.signed_url(key, service.settings.signed_url_expiry_s)
        if signed:
            return signed
        path = f"/items/{item_id}/image" if photo == 0 else f"/items/{item_id}/images/{photo}"
        return f"{base}{path}?version={loaded.version}" + tokens().image_signature(
            name, item_id, loaded.version
        )

    return build


def multipart(schema: type) -> dict[str, Any]:
    """OpenAPI requestBody for a multipart form (parsed by hand, not by webargs)."""
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


def error_responses(*statuses: int) -> dict[str, Any]:
    """OpenAPI entries for the error statuses a route can answer."""
    return {
        str(s): {
            "description": HTTPStatus(s).phrase,
            "content": {"application/json": {"schema": ErrorSchema}},
        }
        for s in statuses
    }
