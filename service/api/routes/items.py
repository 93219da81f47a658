"""Catalog changes: add or replace items, delete them, edit their label and metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flask import request
from marshmallow import EXCLUDE

from service.api.bodies import load, require_multipart
from service.api.context import svc
from service.api.routes.training import Created, submit_zip
from service.api.rules import Blueprint, accepts_upload, error_responses, multipart, requires
from service.api.schemas import (
    AddItemsFormSchema,
    ChangeSchema,
    DeleteItemsSchema,
    EditItemSchema,
    JobCreatedSchema,
    JobOptionsSchema,
)
from service.application.results import ChangeOutcome
from service.core.errors import InvalidParameterError

blp = Blueprint("items", __name__, url_prefix="/", description="Change the catalog item by item")


@blp.route("/<endpoint:name>/items", methods=["POST"])
@requires("write")
@blp.response(202, JobCreatedSchema)
@blp.doc(requestBody=multipart(AddItemsFormSchema), responses=error_responses(404, 409, 415, 422))
@accepts_upload("max_upload_mb", to_disk=True)
def add_items(name: str) -> Created:
    """Add items from a zip or from images; an existing name is replaced (runs in the background)"""
    require_multipart("a zip in field 'file', or images in field 'image'")
    options = load(JobOptionsSchema(), request.form.to_dict())
    upload = request.files.get("file")
    if upload is not None:
        return submit_zip(name, upload.save, options, kind="add")
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

    def write(path: Path) -> None:
        svc().write_images_zip(path, images, label, metadata, item_name)

    return submit_zip(name, write, options, kind="add")


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
    return value


@blp.route("/<endpoint:name>/items/<int:item_id>", methods=["DELETE"])
@requires("write")
@blp.response(200, ChangeSchema)
@blp.doc(responses=error_responses(404, 409))
def delete_item(name: str, item_id: int) -> ChangeOutcome:
    """Delete an item (a new version without it)"""
    return svc().delete_items(name, [item_id], [])


@blp.route("/<endpoint:name>/items", methods=["DELETE"])
@requires("write")
@blp.response(200, ChangeSchema)
@blp.doc(responses=error_responses(404, 409, 413))
@blp.arguments(DeleteItemsSchema, location="json", unknown=EXCLUDE)
def delete_items(args: dict[str, Any], name: str) -> ChangeOutcome:
    """Delete several items by id or name; any unknown one is a 404 and nothing is deleted"""
    return svc().delete_items(name, args["ids"], args["names"])


@blp.route("/<endpoint:name>/items/<int:item_id>", methods=["PATCH"])
@requires("write")
@blp.response(200, ChangeSchema)
@blp.doc(responses=error_responses(404, 409, 413))
@blp.arguments(EditItemSchema, location="json", unknown=EXCLUDE)
def edit_item(args: dict[str, Any], name: str, item_id: int) -> ChangeOutcome:
    """Change an item's label and/or metadata (its vectors stay as they are)"""
    return svc().edit_item(name, item_id, args)
