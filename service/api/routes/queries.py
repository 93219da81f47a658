"""Queries: images in, similar items out; more like an item; an item's image."""

from __future__ import annotations

import os
from typing import Any

from flask import Response, jsonify, redirect, request, send_file
from flask_smorest import Blueprint

from service.api.common import MB, endpoint, error_responses, image_url, require_whole_body, svc, tokens
from service.api.schemas import (
    ImageArgsSchema,
    InferFormSchema,
    InferResultSchema,
    SearchArgsSchema,
    SimilarResultSchema,
)
from service.catalog.images import CONTENT_TYPES
from service.core.errors import InvalidParameterError, PayloadTooLargeError, UnsupportedMediaTypeError
from service.serving import filters, query

blp = Blueprint("queries", __name__, url_prefix="/", description="Search the served version")
IMAGE_RESPONSES = {
    "200": {
        "description": "The original image bytes",
        "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
    },
    **error_responses(404, 503),
}


@blp.route("/<name>/infer", methods=["POST"])
@blp.arguments(SearchArgsSchema, location="query", as_kwargs=True)
@blp.response(200, InferResultSchema)
@blp.doc(
    requestBody={
        "required": True,
        "content": {
            "multipart/form-data": {"schema": InferFormSchema},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    responses=error_responses(400, 404, 413, 415, 422, 503),
)
def infer(
    name: str, k: int | None = None, label: list[str] | None = None, where: str | None = None
) -> Response:
    """The top-k indexed images most similar to each uploaded image (optionally filtered)"""
    service = svc()
    runtime = endpoint(name)
    k = query.check_k(runtime.spec, k)
    flt = filters.parse_filter(label, where)
    request.max_content_length = service.settings.max_image_mb * MB
    request.max_form_parts = service.settings.max_infer_images + 8  # the parser stops there
    uploads, batched = _read_images()
    require_whole_body()
    if len(uploads) > service.settings.max_infer_images:
        raise PayloadTooLargeError(
            f"{len(uploads)} images in one request, over the limit of {service.settings.max_infer_images}"
        )
    loaded = runtime.current()
    settings = service.settings
    found = query.search_images(
        loaded, uploads, k, settings.max_image_pixels, image_url(name), settings.allowed_formats, flt
    )
    result: dict[str, Any] = {"endpoint": name, "version": loaded.version}
    if batched:
        result["batch"] = [{"filename": f, "results": r} for (f, _), r in zip(uploads, found, strict=True)]
    else:
        result["results"] = found[0]
    # Already in the documented shape (schemathesis checks it); skipping the schema's dump saves a
    # tenth of a millisecond of Python per query, on the hottest route.
    return jsonify(result)


def _read_images() -> tuple[list[tuple[str, bytes]], bool]:
    """The uploaded images as (filename, bytes), and whether the request sent several parts."""
    if request.mimetype == "multipart/form-data":
        parts = request.files.getlist("image")
        if not parts:
            raise InvalidParameterError(
                "missing multipart field 'image'",
                errors={"image": ["Missing data for required field."]},
            )
        return [(p.filename or f"image{i}", p.read()) for i, p in enumerate(parts)], len(parts) > 1
    if request.mimetype.startswith("image/"):
        return [("body", request.get_data())], False
    raise UnsupportedMediaTypeError(
        f"send the image as multipart/form-data (field 'image') or as a raw body with an image/* "
        f"content type, not {request.mimetype or 'no content type'!r}"
    )


@blp.route("/<name>/items/<int:item_id>/similar")
@blp.arguments(SearchArgsSchema, location="query", as_kwargs=True)
@blp.response(200, SimilarResultSchema)
@blp.doc(responses=error_responses(404, 422, 503))
def similar(
    name: str, item_id: int, k: int | None = None, label: list[str] | None = None, where: str | None = None
) -> dict[str, Any]:
    """More like an indexed item (the item itself excluded; optionally filtered)"""
    runtime = endpoint(name)
    k = query.check_k(runtime.spec, k)
    flt = filters.parse_filter(label, where)
    loaded = runtime.current()
    results = query.similar_items(loaded, item_id, k, image_url(name), flt)
    return {"endpoint": name, "version": loaded.version, "id": item_id, "results": results}


@blp.route("/<name>/items/<int:item_id>/image")
@blp.arguments(ImageArgsSchema, location="query", as_kwargs=True)
@blp.doc(responses=IMAGE_RESPONSES)
def item_image(
    name: str, item_id: int, version: str | None = None, expires: int | None = None, sig: str | None = None
) -> Response:
    """The original bytes of an item's (first) image"""
    return _image(name, item_id, 0, version, expires, sig)


@blp.route("/<name>/items/<int:item_id>/images/<int:photo>")
@blp.arguments(ImageArgsSchema, location="query", as_kwargs=True)
@blp.doc(responses=IMAGE_RESPONSES)
def item_photo(
    name: str,
    item_id: int,
    photo: int,
    version: str | None = None,
    expires: int | None = None,
    sig: str | None = None,
) -> Response:
    """One of an item's photos (0 is its first; items grouped by the metadata's `item` have several)"""
    return _image(name, item_id, photo, version, expires, sig)


def _image(
    name: str, item_id: int, photo: int, version: str | None, expires: int | None, sig: str | None
) -> Response:
    service = svc()
    runtime = service.registry.get(name)
    # With QUERY_TOKEN set, image URLs carry a signature (browsers cannot send a header).
    if not tokens().valid_image_signature(name, item_id, version, expires, sig):
        tokens().require_query(request.headers.get("Authorization"), name)
    key = service.image_key(runtime, item_id, version, photo)
    mimetype = CONTENT_TYPES.get(os.path.splitext(key)[1], "application/octet-stream")
    local = service.storage.local_path(key)
    if local is not None:
        # A versioned URL always names the same bytes; an unversioned one follows the swaps.
        response = send_file(local, mimetype=mimetype, max_age=86400 if version else 0)
        if tokens().query:  # protected images: never in a shared cache
            response.cache_control.public = False
            response.cache_control.private = True
        return response
    signed = service.storage.signed_url(key, service.settings.signed_url_expiry_s)
    if signed:
        return redirect(signed)  # the bytes come straight from the store, not through this tier
    return Response(service.storage.read(key), mimetype=mimetype)
