"""Training: start a job from an uploaded zip (or an S3 upload), and read a job's status."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flask import request, url_for

from service.api.bodies import json_object, load, require_multipart, save_upload
from service.api.context import svc
from service.api.rules import Blueprint, accepts_upload, authorize, error_responses, multipart, requires
from service.api.schemas import (
    JobCreatedSchema,
    JobOptionsSchema,
    JobSchema,
    TrainAnyFormSchema,
    TrainFormSchema,
    TrainSourceSchema,
    UploadSchema,
)
from service.application.results import Job, UploadTicket
from service.core.errors import InvalidParameterError

blp = Blueprint("training", __name__, url_prefix="/", description="Train new versions in the background")
Created = tuple[dict[str, str], int, dict[str, str]]


@blp.route("/<endpoint:name>/train", methods=["POST"])
@requires("write")
@blp.response(202, JobCreatedSchema)
@blp.doc(
    requestBody={
        "required": True,
        "content": {
            "multipart/form-data": {"schema": TrainFormSchema},
            "application/json": {"schema": TrainSourceSchema},
        },
    },
    responses=error_responses(404, 409, 415, 422),
)
@accepts_upload("max_upload_mb", to_disk=True)
def train(name: str) -> Created:
    """Train a new version from a zip of images (runs in the background)"""
    return _start_training(name)


@blp.route("/train", methods=["POST"])
@requires("write")
@blp.response(202, JobCreatedSchema)
@blp.doc(requestBody=multipart(TrainAnyFormSchema), responses=error_responses(404, 415, 422))
@accepts_upload("max_upload_mb", to_disk=True)
def train_any() -> Created:
    """Train the endpoint named by the form field `endpoint`"""
    require_multipart("a zip in field 'file' and the endpoint name in field 'endpoint'")
    name = request.form.get("endpoint")
    if not name:
        raise InvalidParameterError(
            "missing form field 'endpoint'", errors={"endpoint": ["Missing data for required field."]}
        )
    authorize("write", name)  # the endpoint's own check, now that it is known
    svc().endpoint(name)
    return _start_training(name)


def _start_training(name: str) -> Created:
    if request.mimetype == "application/json":
        args = load(TrainSourceSchema(), json_object())
        job = svc().start_job_from_source(name, args["source"], args["fine_tune"], args["on_duplicate"])
        return created(name, job)
    require_multipart("a zip in field 'file' (or JSON with an s3:// 'source')")
    options = load(JobOptionsSchema(), request.form.to_dict())
    upload = request.files.get("file")
    if upload is None:
        raise InvalidParameterError(
            "missing multipart field 'file' (a zip of images)",
            errors={"file": ["Missing data for required field."]},
        )
    return submit_zip(name, upload.save, options)


def submit_zip(
    name: str, write: Callable[[Path], object], options: dict[str, str], kind: str = "train"
) -> Created:
    """Write the upload to this instance's disk and start a job on it (checked first: 422, 413);
    `options`: the form's fine_tune and on_duplicate."""
    path = svc().new_upload_path()
    save_upload(write, path)
    job = svc().start_job(name, path, options["fine_tune"], kind, options["on_duplicate"])
    return created(name, job)


def created(name: str, job: Job) -> Created:
    status_url = url_for("training.job_status", name=name, job_id=job.id, _external=True)
    return {"job_id": job.id, "status_url": status_url}, 202, {"Location": status_url}


@blp.route("/<endpoint:name>/compact", methods=["POST"])
@requires("write")
@blp.response(202, JobCreatedSchema)
@blp.doc(responses=error_responses(404, 409))
def compact(name: str) -> Created:
    """Merge the endpoint's small segments (and rewrite those with many deleted rows) now, as a job;
    409 when there is nothing to merge. Changes queue one by themselves when it is due."""
    return created(name, svc().compact(name))


@blp.route("/<endpoint:name>/uploads", methods=["POST"])
@requires("write")
@blp.response(201, UploadSchema)
@blp.doc(responses=error_responses(404, 409))
def create_upload(name: str) -> UploadTicket:
    """A pre-signed S3 upload for a large zip; then train with {"source": ...}"""
    return svc().create_upload(name)


@blp.route("/<endpoint:name>/jobs/<job_id>")
@requires("query")
@blp.response(200, JobSchema)
@blp.doc(responses=error_responses(404))
def job_status(name: str, job_id: str) -> Job:
    """A training job's status and progress"""
    return svc().job_status(name, job_id)


@blp.route("/<endpoint:name>/jobs/<job_id>", methods=["DELETE"])
@requires("write")
@blp.response(202, JobSchema)
@blp.doc(responses=error_responses(404, 409))
def cancel_job(name: str, job_id: str) -> Job:
    """Cancel a job: queued, it never runs; running, it stops at its next batch and publishes nothing"""
    return svc().cancel_job(name, job_id)
