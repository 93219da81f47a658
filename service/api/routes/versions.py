"""Versions: list an endpoint's published versions, roll back to one, delete one."""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint

from service.api.common import endpoint, error_responses, json_body, load_body, svc
from service.api.schemas import RollbackSchema, VersionListSchema
from service.storage import versions

blp = Blueprint("versions", __name__, url_prefix="/", description="Published versions and rollback")


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
    args = load_body(RollbackSchema(), json_body())
    return svc().rollback(name, args["version"])


@blp.route("/<name>/versions/<version>", methods=["DELETE"])
@blp.response(200, VersionListSchema)
@blp.doc(responses=error_responses(401, 403, 404, 409))
def delete_version(name: str, version: str) -> dict[str, Any]:
    """Delete a version that is not the current one"""
    endpoint(name, write=True)
    versions.delete_version(svc().storage, name, version)
    return svc().versions_of(name)
