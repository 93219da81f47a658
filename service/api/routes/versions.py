"""Versions: list an endpoint's published versions, roll back to one, delete one."""

from __future__ import annotations

from typing import Any

from marshmallow import EXCLUDE

from service.api.context import svc
from service.api.rules import Blueprint, error_responses, requires
from service.api.schemas import RollbackSchema, VersionListSchema
from service.application.results import VersionList

blp = Blueprint("versions", __name__, url_prefix="/", description="Published versions and rollback")


@blp.route("/<endpoint:name>/versions")
@requires("query")
@blp.response(200, VersionListSchema)
@blp.doc(responses=error_responses(404))
def list_versions(name: str) -> VersionList:
    """The complete published versions (oldest first) and the current one"""
    return svc().versions_of(name)


@blp.route("/<endpoint:name>/rollback", methods=["POST"])
@requires("write")
@blp.response(200, VersionListSchema)
@blp.doc(responses=error_responses(404, 409, 413))
@blp.arguments(RollbackSchema, location="json", unknown=EXCLUDE)
def rollback(args: dict[str, Any], name: str) -> VersionList:
    """Point the endpoint back at an earlier version (every worker follows within seconds)"""
    return svc().rollback(name, args["version"])


@blp.route("/<endpoint:name>/versions/<version>", methods=["DELETE"])
@requires("write")
@blp.response(200, VersionListSchema)
@blp.doc(responses=error_responses(404, 409))
def delete_version(name: str, version: str) -> VersionList:
    """Delete a version that is not the current one"""
    return svc().delete_version(name, version)
