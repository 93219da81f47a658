"""Queries: images in, similar items out; more like an item; an item's image."""

from __future__ import annotations

import time
from typing import Any

from flask import Response, jsonify, redirect, request, send_file, url_for
from werkzeug.wrappers import Response as BaseResponse

from service.api.bodies import require_whole_body
from service.api.context import svc, tokens
from service.api.rules import Blueprint, accepts_upload, error_responses, requires
from service.api.schemas import (
    ImageArgsSchema,
    InferArgsSchema,
    InferFormSchema,
    InferResultSchema,
    SearchArgsSchema,
    SimilarResultSchema,
)
from service.application.service import RouteUrl
from service.core.errors import InvalidParameterError, UnsupportedMediaTypeError

blp = Blueprint("queries", __name__, url_prefix="/", description="Search the served version")
IMAGE_RESPONSES = {
    "200": {
        "description": "The original image bytes",
        "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
    },
    **error_responses(404, 503),
}


@blp.route("/<endpoint:name>/infer", methods=["POST"])
@requires("query")
@blp.arguments(InferArgsSchema, location="query", as_kwargs=True)
@blp.response(200, InferResultSchema)
@blp.doc(
    requestBody={
        "required": True,
        "content": {
            "multipart/form-data": {"schema": InferFormSchema},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    responses=error_responses(400, 404, 415, 422, 503),
)
@accepts_upload("max_image_mb")
def infer(
    name: str,
    k: int | None = None,
    label: list[str] | None = None,
    where: str | None = None,
    duplicates: bool = False,
    duplicates_only: bool = False,
) -> Response:
    """The top-k indexed images most similar to each uploaded image (optionally filtered; with
    duplicates=true each marked `duplicate`, with duplicates_only=true only those)"""
    service = svc()
    args = service.search_args(name, k, label, where, duplicates, duplicates_only)
    request.max_form_parts = service.settings.max_infer_images + 8  # the parser stops there
    uploads, batched = _read_images()
    require_whole_body()
    found = service.infer(name, uploads, args, route_url(name))
    result: dict[str, Any] = {"endpoint": name, "version": found.version}
    if batched:
        result["batch"] = [
            {"filename": f, "results": r} for (f, _), r in zip(uploads, found.results, strict=True)
        ]
    else:
        result["results"] = found.results[0]
    # Already in the documented shape (schemathesis checks it); skipping the schema's dump saves a
    # tenth of a millisecond of Python per query, on the hottest route.
    return jsonify(result)


def _read_images() -> tuple[list[tuple[str, bytes]], bool]:
    """The uploaded images as (filename, bytes), and whether the request sent several parts."""
    if request.mimetype == "multipart/form-data":
        parts = request.files.getlist("image")
        if not parts:
            raise InvalidParameterError(
                "missing multipart field 'image'", errors={"image": ["Missing data for required field."]}
            )
        return [(p.filename or f"image{i}", p.read()) for i, p in enumerate(parts)], len(parts) > 1
    if request.mimetype.startswith("image/"):
        return [("body", request.get_data())], False
    raise UnsupportedMediaTypeError(
        f"send the image as multipart/form-data (field 'image') or as a raw body with an image/* "
        f"content type, not {request.mimetype or 'no content type'!r}"
    )


def route_url(name: str) -> RouteUrl:
    """The service's own URL of an item's image in a version (signed when QUERY_TOKEN is set)."""
    # One url_for per request, not per result: the route differs only in the id.
    base = url_for("queries.item_image", name=name, item_id=0, _external=True).removesuffix("/items/0/image")

    def build(item_id: int, photo: int, version: str) -> str:
        path = f"/items/{item_id}/image" if photo == 0 else f"/items/{item_id}/images/{photo}"
        return f"{base}{path}?version={version}" + tokens().image_signature(name, item_id, version)

    return build


@blp.route("/<endpoint:name>/items/<int:item_id>/similar")
@requires("query")
@blp.arguments(SearchArgsSchema, location="query", as_kwargs=True)
@blp.response(200, SimilarResultSchema)
@blp.doc(responses=error_responses(404, 422, 503))
def similar(
    name: str, item_id: int, k: int | None = None, label: list[str] | None = None, where: str | None = None
) -> dict[str, Any]:
    """More like an indexed item (the item itself excluded; optionally filtered)"""
    service = svc()
    found = service.similar(name, item_id, service.search_args(name, k, label, where), route_url(name))
    return {"endpoint": name, "version": found.version, "id": item_id, "results": found.results[0]}


@blp.route("/<endpoint:name>/items/<int:item_id>/image")
@requires("image")
@blp.arguments(ImageArgsSchema, location="query", as_kwargs=True)
@blp.doc(responses=IMAGE_RESPONSES)
def item_image(
    name: str, item_id: int, version: str | None = None, expires: int | None = None, **_: Any
) -> BaseResponse:
    """The original bytes of an item's (first) image"""
    return _image(name, item_id, 0, version, expires)


@blp.route("/<endpoint:name>/items/<int:item_id>/images/<int:photo>")
@requires("image")
@blp.arguments(ImageArgsSchema, location="query", as_kwargs=True)
@blp.doc(responses=IMAGE_RESPONSES)
def item_photo(
    name: str, item_id: int, photo: int, version: str | None = None, expires: int | None = None, **_: Any
) -> BaseResponse:
    """One of an item's photos (0 is its first; items grouped by the metadata's `item` have several)"""
    return _image(name, item_id, photo, version, expires)


def _image(name: str, item_id: int, photo: int, version: str | None, expires: int | None) -> BaseResponse:
    source = svc().item_image(name, item_id, photo, version)
    if source.path is not None:
        # A versioned URL always names the same bytes; an unversioned one follows the swaps. A signed
        # URL is cached no longer than its signature lasts.
        max_age = 86400 if source.versioned else 0
        if expires is not None:
            max_age = max(0, min(max_age, expires - int(time.time())))
        response = send_file(source.path, mimetype=source.mimetype, max_age=max_age)
        if tokens().query:  # protected images: never in a shared cache
            response.cache_control.public = False
            response.cache_control.private = True
        return response
    if source.url is not None:
        return redirect(source.url)
    return Response(source.data, mimetype=source.mimetype)
