"""Image-similarity service: per-endpoint TF-Hub encoders, Annoy indexes, Flask API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from flask import Flask


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """The WSGI app (gunicorn: "service:create_app()"); imported lazily to keep the CLI fast."""
    from service.api.app import create_app as _create_app

    return _create_app(config)
