"""Declarative HTTP rules on views: who may call a route (`@requires`) and how big a body it takes
(`@accepts_upload`). Each also writes what it may answer into the route's OpenAPI description."""

from __future__ import annotations

import functools
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, TypeVar

import flask_smorest
from flask import current_app, request
from flask_smorest.error_handler import ErrorSchema  # {code, status, message, errors}
from werkzeug.routing import BaseConverter

from service.api.bodies import MB, BodyParser
from service.api.context import svc, tokens
from service.core.endpoint import RESERVED_NAMES, SLUG

SMALL_BODY = 1 * MB  # what a route that takes no upload reads at most
KINDS = ("query", "write", "image")
View = TypeVar("View", bound=Callable[..., Any])


class EndpointName(BaseConverter):
    """`<endpoint:name>`: routed like a plain `<name>` (any path segment: an unknown name is the
    service's own 404, after the token check), documented as what an endpoint name can be."""

    SCHEMA = {"type": "string", "pattern": SLUG.pattern, "not": {"enum": sorted(RESERVED_NAMES)}}


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest's Blueprint with the service's JSON body rules (`bodies.BodyParser`)."""

    ARGUMENTS_PARSER = BodyParser()


def error_responses(*statuses: int) -> dict[str, Any]:
    """OpenAPI entries for the error statuses a route can answer."""
    return {
        str(s): {
            "description": HTTPStatus(s).phrase,
            "content": {"application/json": {"schema": ErrorSchema}},
        }
        for s in statuses
    }


def requires(kind: str) -> Callable[[View], View]:
    """The token a route needs, checked before anything else (its query string and body included;
    put it right under `@blp.route`): "query" (open
    unless QUERY_TOKEN is set), "write" (the admin token or the endpoint's own), or "image"
    (a query token, or the signature of a signed image URL). On a route with an endpoint `name`,
    the endpoint is looked up next: an unknown name answers like a known one (401/403) to a
    caller without a token, and 404 before its body is read to one with."""
    if kind not in KINDS:
        raise ValueError(f"requires() takes one of {KINDS}, got {kind!r}")

    def decorate(view: View) -> View:
        @functools.wraps(view)
        def checked(*args: Any, **kwargs: Any) -> Any:
            authorize(kind, kwargs.get("name"))
            if kwargs.get("name") is not None:
                svc().endpoint(kwargs["name"])
            return view(*args, **kwargs)

        checked.required_token = kind  # type: ignore[attr-defined]
        documented = flask_smorest.Blueprint.doc(
            responses=error_responses(401, 403), security=[{"bearerAuth": []}, {}]
        )
        return documented(checked)

    return decorate


def authorize(kind: str, name: str | None) -> None:
    """Check the request's token for `kind` on endpoint `name` (None: any endpoint)."""
    header = request.headers.get("Authorization")
    if kind == "write":
        if name is None:
            tokens().require_any_write(header)  # the endpoint's own check follows, once it is known
        else:
            tokens().require_write(header, name)
    elif kind == "image":
        args = request.args
        expires = args.get("expires", type=int)
        if not tokens().valid_image_signature(
            name or "", _item(), args.get("version"), expires, args.get("sig")
        ):
            tokens().require_query(header, name)
    else:
        tokens().require_query(header, name)


def _item() -> int:
    return int((request.view_args or {}).get("item_id", -1))


def accepts_upload(setting: str, to_disk: bool = False) -> Callable[[View], View]:
    """A route that takes an upload: its body may be as large as the setting `setting` (in MB);
    every other route reads at most SMALL_BODY. `to_disk`: the upload is written to this
    instance's disk (507 when it is full)."""

    def decorate(view: View) -> View:
        view.upload_limit_setting = setting  # type: ignore[attr-defined]
        statuses = (413, 507) if to_disk else (413,)
        return flask_smorest.Blueprint.doc(responses=error_responses(*statuses))(view)

    return decorate


def cap_bodies() -> None:
    """Before each request: the route's body limit (a big one only where `@accepts_upload` says)."""
    view = current_app.view_functions.get(request.endpoint or "")
    setting = getattr(view, "upload_limit_setting", None)
    request.max_content_length = SMALL_BODY if setting is None else getattr(svc().settings, setting) * MB


def multipart(schema: type) -> dict[str, Any]:
    """OpenAPI requestBody for a multipart form (parsed by hand, not by webargs)."""
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
