"""HTTP views: parse the request, call a plain function, return its result. No logic lives here."""

from __future__ import annotations

import logging
import os
import secrets
from http import HTTPStatus
from typing import Any

from flask import Flask, Response, current_app, jsonify, redirect, request, send_file, url_for
from flask_smorest import Blueprint
from flask_smorest.error_handler import ErrorSchema  # {code, status, message, errors}
from marshmallow import EXCLUDE, Schema, ValidationError
from werkzeug.exceptions import HTTPException

from . import ingest, query, versions
from .errors import (
    ForbiddenError,
    InvalidParameterError,
    JobRetryError,
    NotFoundError,
    ServiceError,
    UnsupportedMediaTypeError,
)
from .images import CONTENT_TYPES
from .runtime import Service
from .schemas import (
    EndpointListSchema,
    EndpointSchema,
    HealthSchema,
    ImageArgsSchema,
    InferFormSchema,
    InferResultSchema,
    JobCreatedSchema,
    JobSchema,
    KArgsSchema,
    RollbackSchema,
    SimilarResultSchema,
    TrainAnyFormSchema,
    TrainFormSchema,
    TrainSourceSchema,
    UploadSchema,
    VersionListSchema,
    WorkerMessageSchema,
    WorkerResultSchema,
)
from .serving import EndpointRuntime, LoadedVersion

log = logging.getLogger(__name__)
blp = Blueprint("simsvc", __name__, url_prefix="/", description="Train and query endpoints")
MB = 1024 * 1024


def svc() -> Service:
    return current_app.extensions["simsvc"]


SMALL_BODY = 1 * MB
BIG_BODY_ROUTES = {"simsvc.train", "simsvc.train_any", "simsvc.infer"}


@blp.before_request
def cap_small_bodies() -> None:
    """Routes that take no upload take at most 1 MB, so nobody makes a worker read a big body."""
    if request.endpoint not in BIG_BODY_ROUTES:
        request.max_content_length = SMALL_BODY


def endpoint(name: str, write: bool = False) -> EndpointRuntime:
    """The named endpoint (404 if unknown), once the request's token allows the action."""
    service = svc()
    runtime = service.registry.get(name)
    header = request.headers.get("Authorization")
    if write:
        service.tokens.require_write(header, name)
    else:
        service.tokens.require_query(header, name)
    return runtime


def multipart(schema: type) -> dict[str, Any]:
    """OpenAPI requestBody for a multipart form (parsed by hand: see `_upload`)."""
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


def image_url(name: str) -> query.ImageUrlFn:
    """Pre-signed store URLs where the store gives them (S3), else this service's image route."""
    service = svc()
    # One url_for per request, not per result: the route differs only in the id.
    template = url_for("simsvc.item_image", name=name, item_id=0, _external=True).replace(
        "/items/0/image", "/items/{}/image?version={}"
    )

    def build(loaded: LoadedVersion, item_id: int, item: dict[str, Any]) -> str:
        key = versions.version_prefix(name, loaded.version) + item["image"]
        signed = service.storage.signed_url(key, service.settings.signed_url_expiry_s)
        return signed or template.format(item_id, loaded.version) + service.tokens.image_signature(
            name, item_id, loaded.version
        )

    return build


# --- service ---------------------------------------------------------------------------------


@blp.route("/health")
@blp.response(200, HealthSchema)
def health() -> dict[str, Any]:
    """Liveness: answers at once, even while models load"""
    return {"status": "ok", "worker": os.getpid(), "endpoints": svc().registry.versions_served()}


@blp.route("/endpoints")
@blp.response(200, EndpointListSchema)
def list_endpoints() -> dict[str, Any]:
    """Every endpoint with its served version"""
    svc().tokens.require_query(request.headers.get("Authorization"), None)
    return {"endpoints": [r.status() for r in svc().registry.endpoints.values()]}


@blp.route("/<name>")
@blp.response(200, EndpointSchema)
@blp.doc(responses=error_responses(404))
def endpoint_info(name: str) -> dict[str, Any]:
    """An endpoint: served version, item count, labels, encoder, trained time"""
    return endpoint(name).status()


# --- training --------------------------------------------------------------------------------


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
    svc().tokens.require_any_write(request.headers.get("Authorization"))
    _require_multipart("a zip in field 'file' and the endpoint name in field 'endpoint'")
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
        args = _load(TrainSourceSchema(), request.get_json(silent=True))
        service.check_source(args["source"], name)
        job = service.jobs.submit(name, source=args["source"], fine_tune=args["fine_tune"])
    else:
        _require_multipart("a zip in field 'file' (or JSON with an s3:// 'source')")
        fine_tune = _load(TrainSourceSchema(only=("fine_tune",)), request.form.to_dict())["fine_tune"]
        upload = request.files.get("file")
        if upload is None:
            raise InvalidParameterError(
                "missing multipart field 'file' (a zip of images)",
                errors={"file": ["Missing data for required field."]},
            )
        path = service.uploads_dir / f"{os.getpid()}-{secrets.token_hex(8)}.zip"  # owner's pid first
        try:
            upload.save(path)
            # Answer now (422, 413) for a file that is not a zip or is over the limits.
            with ingest.open_zip(path) as zf:
                ingest.check_limits(zf, ingest.ZipLimits.from_settings(service.settings))
            job = service.jobs.submit(name, zip_path=path, fine_tune=fine_tune)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    status_url = url_for("simsvc.job_status", name=name, job_id=job.id, _external=True)
    return {"job_id": job.id, "status_url": status_url}, 202, {"Location": status_url}


def _load(schema: Schema, data: Any) -> dict[str, Any]:
    """Validate a body with a marshmallow schema; 422 with the field errors if it does not fit."""
    if not isinstance(data, dict):
        raise InvalidParameterError("the body must be a JSON object")
    try:
        return schema.load(data, unknown=EXCLUDE)
    except ValidationError as exc:
        raise InvalidParameterError("invalid parameters", errors=exc.normalized_messages()) from None


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
    return svc().jobs.status(name, job_id)


# --- queries ---------------------------------------------------------------------------------


@blp.route("/<name>/infer", methods=["POST"])
@blp.arguments(KArgsSchema, location="query", as_kwargs=True)
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
def infer(name: str, k: int | None = None) -> Response:
    """The top-k indexed images most similar to each uploaded image"""
    service = svc()
    runtime = endpoint(name)
    k = query.check_k(runtime.spec, k)
    request.max_content_length = service.settings.max_image_mb * MB
    uploads, batched = _read_images()
    loaded = runtime.current()
    settings = service.settings
    found = query.search_images(
        loaded, uploads, k, settings.max_image_pixels, image_url(name), settings.allowed_formats
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


def _require_multipart(what: str) -> None:
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaTypeError(
            f"send multipart/form-data with {what}, not {request.mimetype or 'no content type'!r}"
        )


@blp.route("/<name>/items/<int:item_id>/similar")
@blp.arguments(KArgsSchema, location="query", as_kwargs=True)
@blp.response(200, SimilarResultSchema)
@blp.doc(responses=error_responses(404, 422, 503))
def similar(name: str, item_id: int, k: int | None = None) -> dict[str, Any]:
    """More like an indexed item (the item itself excluded)"""
    runtime = endpoint(name)
    k = query.check_k(runtime.spec, k)
    loaded = runtime.current()
    results = query.similar_items(loaded, item_id, k, image_url(name))
    return {"endpoint": name, "version": loaded.version, "id": item_id, "results": results}


@blp.route("/<name>/items/<int:item_id>/image")
@blp.arguments(ImageArgsSchema, location="query", as_kwargs=True)
@blp.doc(
    responses={
        "200": {
            "description": "The original image bytes",
            "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
        },
        **error_responses(404, 503),
    }
)
def item_image(
    name: str, item_id: int, version: str | None = None, expires: int | None = None, sig: str | None = None
) -> Response:
    """The original bytes of an indexed image"""
    service = svc()
    runtime = service.registry.get(name)
    # With QUERY_TOKEN set, image URLs carry a signature (browsers cannot send a header).
    if not service.tokens.valid_image_signature(name, item_id, version, expires, sig):
        service.tokens.require_query(request.headers.get("Authorization"), name)
    key = service.image_key(runtime, item_id, version)
    mimetype = CONTENT_TYPES.get(os.path.splitext(key)[1], "application/octet-stream")
    local = service.storage.local_path(key)
    if local is not None:
        # A versioned URL always names the same bytes; an unversioned one follows the swaps.
        return send_file(local, mimetype=mimetype, max_age=86400 if version else 0)
    signed = service.storage.signed_url(key, service.settings.signed_url_expiry_s)
    if signed:
        return redirect(signed)  # the bytes come straight from the store, not through this tier
    return Response(service.storage.read(key), mimetype=mimetype)


# --- versions ------------------------------------------------------------------------------------


@blp.route("/<name>/versions")
@blp.response(200, VersionListSchema)
@blp.doc(responses=error_responses(401, 403, 404))
def list_versions(name: str) -> dict[str, Any]:
    """The complete published versions (oldest first) and the current one"""
    endpoint(name)
    return svc().versions_of(name)


@blp.route("/<name>/rollback", methods=["POST"])
@blp.response(200, VersionListSchema)
@blp.doc(
    requestBody={"required": True, "content": {"application/json": {"schema": RollbackSchema}}},
    responses=error_responses(401, 403, 404, 409, 413, 422),
)
def rollback(name: str) -> dict[str, Any]:
    """Point the endpoint back at an earlier version (every worker follows within seconds)"""
    endpoint(name, write=True)  # the token first, then the body
    args = _load(RollbackSchema(), request.get_json(silent=True))
    versions.rollback(svc().storage, name, args["version"])
    return svc().versions_of(name)


@blp.route("/<name>/versions/<version>", methods=["DELETE"])
@blp.response(200, VersionListSchema)
@blp.doc(responses=error_responses(401, 403, 404, 409))
def delete_version(name: str, version: str) -> dict[str, Any]:
    """Delete a version that is not the current one"""
    endpoint(name, write=True)
    versions.delete_version(svc().storage, name, version)
    return svc().versions_of(name)


# --- the worker tier -------------------------------------------------------------------------

LOOPBACK = ("127.0.0.1", "::1")


@blp.route("/worker/jobs", methods=["POST"])
@blp.response(200, WorkerResultSchema)
@blp.doc(responses=error_responses(403, 404, 422, 503))
def worker_job() -> dict[str, Any]:
    """Run a queued training job (worker tier only; the SQS daemon on this instance posts here)"""
    service = svc()
    if service.settings.service_role != "worker":
        raise NotFoundError("this instance is not a worker (SERVICE_ROLE=worker)")
    forwarded = [a.strip() for a in request.headers.get("X-Forwarded-For", "").split(",") if a.strip()]
    from_daemon = request.user_agent.string.startswith("aws-sqsd")
    if request.remote_addr not in LOOPBACK or any(a not in LOOPBACK for a in forwarded) or not from_daemon:
        raise ForbiddenError("only the SQS daemon on this instance delivers jobs")
    message = _load(WorkerMessageSchema(), request.get_json(silent=True))
    attempt = int(request.headers.get("X-Aws-Sqsd-Receive-Count", "1") or 1)
    finished = service.jobs.run_delivered(message["job_id"], attempt, service.settings.job_max_attempts)
    job = service.jobs.store.load(None, message["job_id"])
    if not finished:
        raise JobRetryError(f"job {job.id}: {job.error}")
    return {"job_id": job.id, "status": job.status, "error": job.error}


# --- errors ----------------------------------------------------------------------------------


def register_error_handlers(app: Flask) -> None:
    """One JSON shape for every error: {"code", "status", "message", "errors"?}."""

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
        if code == 413:
            message = "request body too large"
            limit = request.max_content_length
            if limit:
                message += f" (limit {limit // MB} MB for this route)"
        elif code == 422 and errors:
            message = "invalid parameters"
        else:
            message = data.get("message") or exc.description or HTTPStatus(code).phrase
        return payload(code, message, errors)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[dict[str, Any], int]:
        # Tracebacks go to the log only; the client gets a safe, stable message.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return payload(500, "internal error; the server log has the details")
