"""Catalogue changes: add or replace items, delete them, edit their label and metadata."""

from __future__ import annotations

import json
from typing import Any

from flask import request
from flask_smorest import Blueprint

from service.api.common import (
    endpoint,
    error_responses,
    json_body,
    load_body,
    multipart,
    require_multipart,
    svc,
)
from service.api.routes.training import submit_zip
from service.api.schemas import (
    AddItemsFormSchema,
    ChangeSchema,
    DeleteItemsSchema,
    EditItemSchema,
    JobCreatedSchema,
    TrainSourceSchema,
)
from service.catalog import ingest
from service.core.errors import InvalidParameterError

blp = Blueprint("items", __name__, url_prefix="/", description="Change the catalogue item by item")


@blp.route("/<name>/items", methods=["POST"])
@blp.response(202, JobCreatedSchema)
@blp.doc(
    requestBody=multipart(AddItemsFormSchema), responses=error_responses(401, 403, 404, 409, 413, 415, 422)
)
def add_items(name: str) -> tuple[dict[str, str], int, dict[str, str]]:
    """Add items from a zip or from images; an existing name is replaced (runs in the background)"""
    endpoint(name, write=True)  # 404, 401, 403 before reading a large body
    require_multipart("a zip in field 'file', or images in field 'image'")
    fine_tune = load_body(TrainSourceSchema(only=("fine_tune",)), request.form.to_dict())["fine_tune"]
    upload = request.files.get("file")
    if upload is not None:
        return submit_zip(name, upload.save, fine_tune, kind="add")
    parts = request.files.getlist("image")
    if not parts:
        raise InvalidParameterError(
            "send a zip in field 'file' or one or more images in field 'image'",
            errors={"file": ["Missing data for required field."]},
        )
    images = [(p.filename or f"image{i}.jpg", p.read()) for i, p in enumerate(parts)]
    metadata = _metadata_field(request.form.get("metadata"))
    label = request.form.get("label") or None
    item_name = request.form.get("name") or None

    def write(path: Any) -> None:
        ingest.write_images_zip(path, images, label, metadata, item_name)

    return submit_zip(name, write, fine_tune, kind="add")


def _metadata_field(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise InvalidParameterError(
            "'metadata' must be a JSON object", errors={"metadata": ["Not a JSON object."]}
        )
    return ingest.check_metadata(value)


@blp.route("/<name>/items/<int:item_id>", methods=["DELETE"])
@blp.response(200, ChangeSchema)
@blp.doc(responses=error_responses(401, 403, 404, 409))
def delete_item(name: str, item_id: int) -> dict[str, Any]:
    """Delete an item (a new version without it)"""
    endpoint(name, write=True)
    return svc().delete_items(name, [item_id], [])


@blp.route("/<name>/items", methods=["DELETE"])
@blp.response(200, ChangeSchema)
@blp.doc(
    requestBody={"required": True, "content": {"application/json": {"schema": DeleteItemsSchema}}},
    responses=error_responses(401, 403, 404, 409, 413, 422),
)
def delete_items(name: str) -> dict[str, Any]:
    """Delete several items by id or name; any unknown one is a 404 and nothing is deleted"""
    endpoint(name, write=True)
    args = load_body(DeleteItemsSchema(), json_body())
    return svc().delete_items(name, args["ids"], args["names"])


@blp.route("/<name>/items/<int:item_id>", methods=["PATCH"])
@blp.response(200, ChangeSchema)
@blp.doc(
    requestBody={"required": True, "content": {"application/json": {"schema": EditItemSchema}}},
    responses=error_responses(401, 403, 404, 409, 413, 422),
)
def edit_item(name: str, item_id: int) -> dict[str, Any]:
    """Change an item's label and/or metadata (its vectors stay as they are)"""
    endpoint(name, write=True)
    args = load_body(EditItemSchema(), json_body())
    return svc().edit_item(name, item_id, args)
