"""Reading request bodies: whole or refused (413), JSON objects for `@blp.arguments`, multipart
forms, uploads written to disk (507 when it is full)."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from flask import request
from marshmallow import EXCLUDE, Schema, ValidationError
from webargs.flaskparser import FlaskParser

from service.core.errors import (
    InsufficientStorageError,
    InvalidParameterError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)

MB = 1024 * 1024


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
            f"request body too large (limit {(request.max_content_length or 0) // MB} MB for this route)"
        )


def json_object() -> dict[str, Any]:
    """The request's JSON body, which must be an object; absurd nesting is a 422, not a 500."""
    try:
        data = request.get_json(silent=True)
    except RecursionError:
        raise InvalidParameterError("the JSON body is nested too deeply") from None
    if not isinstance(data, dict):
        require_whole_body()  # a chunked body cut at the limit reads as broken JSON: say why
        raise InvalidParameterError("the body must be a JSON object")
    return data


def load(schema: Schema, data: dict[str, Any]) -> dict[str, Any]:
    """Validate fields read by hand (a multipart form's, or a JSON body that may also be a form);
    422 with the field errors if they do not fit."""
    try:
        return schema.load(data, unknown=EXCLUDE)
    except ValidationError as exc:
        raise InvalidParameterError("invalid parameters", errors=exc.normalized_messages()) from None


class BodyParser(FlaskParser):
    """webargs' parser for `@blp.arguments(..., location="json")`: the body must be a JSON object
    (422 naming that, never a 400 for malformed JSON), whole (413 when over the route's limit)."""

    def load_json(self, req: Any, schema: Schema) -> Any:
        return json_object()

    def handle_error(self, error: ValidationError, req: Any, schema: Schema, **kwargs: Any) -> NoReturn:
        """A body's field errors as {"field": [...]}, like every hand-read body and form; those of a
        query string stay under "query" (as webargs reports them)."""
        messages = error.normalized_messages()
        if isinstance(messages, dict) and set(messages) == {"json"}:
            raise InvalidParameterError("invalid parameters", errors=messages["json"])
        super().handle_error(error, req, schema, **kwargs)


def require_multipart(what: str) -> None:
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaTypeError(
            f"send multipart/form-data with {what}, not {request.mimetype or 'no content type'!r}"
        )


def save_upload(write: Callable[[Path], object], path: Path) -> None:
    """Write an upload to this instance's disk, whole; a full disk is a 507 the client can retry."""
    try:
        write(path)
        require_whole_body()
    except OSError as exc:
        path.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise InsufficientStorageError(
                "this instance's disk is full; the upload was not kept (try again later)"
            ) from None
        raise
    except BaseException:
        path.unlink(missing_ok=True)
        raise
