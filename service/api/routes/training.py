"""Training: start a job from an uploaded zip (or an S3 upload), and read a job's status."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import request, url_for
from flask_smorest import Blueprint

from service.api.common import (
    endpoint,
    error_responses,
    json_body,
    load_body,
    multipart,
    require_multipart,
    require_whole_body,
    save_upload,
    svc,
    tokens,
)
from service.api.schemas import (
    JobCreatedSchema,
    JobSchema,
    TrainAnyFormSchema,
    TrainFormSchema,
    TrainSourceSchema,
    UploadSchema,
)
from service.catalog import ingest
from service.core.errors import InvalidParameterError

blp = Blueprint("training", __name__, url_prefix="/", description="Train new versions in the background")


@blp.route("/<name>/train", methods=["POST"])
@blp.response(202, JobCreatedSchema)
@blp.doc(
    requestBody={
        "required": True,
        "content": {
            "multipart/form-data": {"schema": TrainFormSchema},
            "application/json": {"schema": TrainSourceSchema},
        },
    },
    responses=error_responses(403, 404, 409, 413, 415, 422),
)
def train(name: str) -> tuple[dict[str, str], int, dict[str, str]]:
    """Train a new version from a zip of images (runs in the background)"""
    return _start_training(name)


@blp.route("/train", methods=["POST"])
@blp.response(202, JobCreatedSchema)
@blp.doc(requestBody=multipart(TrainAnyFormSchema), responses=error_responses(404, 413, 415, 422))
def train_any() -> tuple[dict[str, str], int, dict[str, str]]:
    """Train the endpoint named by the form field `endpoint`"""
    # Some write token before the body is read; the endpoint's own check follows.
    tokens().require_any_write(request.headers.get("Authorization"))
    require_multipart("a zip in field 'file' and the endpoint name in field 'endpoint'")
    name = request.form.get("endpoint")
    if not name:
        raise InvalidParameterError(
            "missing form field 'endpoint'", errors={"endpoint": ["Missing data for required field."]}
        )
    return _start_training(name)


def _start_training(name: str) -> tuple[dict[str, str], int, dict[str, str]]:
    service = svc()
    endpoint(name, write=True)  # 404, 401, 403 before reading a large body
    if request.mimetype == "application/json":
        args = load_body(TrainSourceSchema(), json_body())
        service.check_source(args["source"], name)
        job = service.jobs.submit(name, source=args["source"], fine_tune=args["fine_tune"])
    else:
        require_multipart("a zip in field 'file' (or JSON with an s3:// 'source')")
        fine_tune = load_body(TrainSourceSchema(only=("fine_tune",)), request.form.to_dict())["fine_tune"]
        upload = request.files.get("file")
        if upload is None:
            raise InvalidParameterError(
                "missing multipart field 'file' (a zip of images)",
                errors={"file": ["Missing data for required field."]},
            )
        return submit_zip(name, upload.save, fine_tune)
    return _created(name, job.id)


def submit_zip(
    name: str, write: Callable[[Path], object], fine_tune: str, kind: str = "train"
) -> tuple[dict[str, str], int, dict[str, str]]:
    """Write the upload to a file, check it is a zip within the limits, and start a job on it."""
    service = svc()
    path = service.uploads_dir / f"{os.getpid()}-{secrets.token_hex(8)}.zip"  # owner's pid first
    try:
        save_upload(write, path)
        require_whole_body()
        # Answer now (422, 413) for a file that is not a zip or is over the limits.
        with ingest.open_zip(path) as zf:
            ingest.check_limits(zf, ingest.ZipLimits.from_settings(service.settings))
        job = service.jobs.submit(name, zip_path=path, fine_tune=fine_tune, kind=kind)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return _created(name, job.id)


def _created(name: str, job_id: str) -> tuple[dict[str, str], int, dict[str, str]]:
    status_url = url_for("training.job_status", name=name, job_id=job_id, _external=True)
    return {"job_id": job_id, "status_url": status_url}, 202, {"Location": status_url}


@blp.route("/<name>/uploads", methods=["POST"])
@blp.response(201, UploadSchema)
@blp.doc(responses=error_responses(404, 409))
def create_upload(name: str) -> dict[str, Any]:
    """A pre-signed S3 upload for a large zip; then train with {"source": ...}"""
    endpoint(name, write=True)
    return svc().create_upload(name)


@blp.route("/<name>/jobs/<job_id>")
@blp.response(200, JobSchema)
@blp.doc(responses=error_responses(404))
def job_status(name: str, job_id: str) -> dict[str, Any]:
    """A training job's status and progress"""
    endpoint(name)
    return svc().job_status(name, job_id)
