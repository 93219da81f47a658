"""Duplicates: a report over the served version (a job), read back as JSON or CSV, and groups a
person marks "not duplicates"."""

from __future__ import annotations

from typing import Any

from flask import Response, request
from marshmallow import EXCLUDE

from service.api.context import svc
from service.api.routes.queries import route_url
from service.api.routes.training import Created, created
from service.api.rules import Blueprint, error_responses, requires
from service.api.schemas import (
    DuplicateMarkSchema,
    DuplicateMarksSchema,
    DuplicateReportSchema,
    DuplicatesArgsSchema,
    JobCreatedSchema,
)
from service.core.errors import ConflictError

blp = Blueprint("duplicates", __name__, url_prefix="/", description="Find duplicate images in a catalogue")


@blp.route("/<endpoint:name>/duplicates", methods=["POST"])
@requires("write")
@blp.arguments(DuplicatesArgsSchema, location="query", as_kwargs=True)
@blp.response(202, JobCreatedSchema)
@blp.doc(responses=error_responses(404, 409, 413, 422))
def start(name: str, threshold: float | None = None) -> Created:
    """Report the served version's groups of duplicates (runs in the background, like a train)"""
    return created(name, svc().start_duplicates(name, threshold))


@blp.route("/<endpoint:name>/duplicates/<job_id>")
@requires("query")
@blp.response(200, DuplicateReportSchema)
@blp.doc(
    responses={
        "200": {"content": {"text/csv": {"schema": {"type": "string"}}}},
        **error_responses(404, 409),
    }
)
def report(name: str, job_id: str) -> Any:
    """A report: its job's status, then its groups (JSON, or CSV with `Accept: text/csv`)"""
    found = svc().duplicates_report(name, job_id, route_url(name))
    if request.accept_mimetypes.best_match(["application/json", "text/csv"]) == "text/csv":
        if found["status"] != "succeeded":
            raise ConflictError(f"report {job_id} is {found['status']}; its CSV comes once it has succeeded")
        filename = f"{name}-duplicates-{found['version']}.csv"
        return Response(
            svc().duplicates_csv(found),
            mimetype="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    return found


@blp.route("/<endpoint:name>/duplicates/ignored", methods=["POST"])
@requires("write")
@blp.arguments(DuplicateMarkSchema, location="json", unknown=EXCLUDE)
@blp.response(200, DuplicateMarksSchema)
@blp.doc(responses=error_responses(404, 409, 413, 422))
def mark(args: dict[str, Any], name: str) -> dict[str, Any]:
    """Mark a group "not duplicates": the next reports leave it out"""
    return {"endpoint": name, "ignored": svc().mark_not_duplicates(name, args["ids"])}


@blp.route("/<endpoint:name>/duplicates/ignored", methods=["DELETE"])
@requires("write")
@blp.arguments(DuplicateMarkSchema, location="json", unknown=EXCLUDE)
@blp.response(200, DuplicateMarksSchema)
@blp.doc(responses=error_responses(404, 409, 413, 422))
def unmark(args: dict[str, Any], name: str) -> dict[str, Any]:
    """Forget a "not duplicates" mark (the same ids as marked)"""
    return {"endpoint": name, "ignored": svc().unmark_not_duplicates(name, args["ids"])}


@blp.route("/<endpoint:name>/duplicates/ignored")
@requires("query")
@blp.response(200, DuplicateMarksSchema)
@blp.doc(responses=error_responses(404))
def marks(name: str) -> dict[str, Any]:
    """The groups marked "not duplicates\""""
    return {"endpoint": name, "ignored": svc().not_duplicates(name)}
