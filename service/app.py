"""The Flask app factory: settings -> service parts -> routes, OpenAPI docs and error handlers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask, send_from_directory
from flask_smorest import Api
from swagger_ui_bundle import swagger_ui_path

from .api import blp, register_error_handlers
from .config import Settings
from .runtime import build_service

MB = 1024 * 1024


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app. `config` overrides environment variables (tests pass their settings here)."""
    settings = Settings.load(config)
    service = build_service(settings)

    app = Flask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_upload_mb * MB,
        API_TITLE="Image similarity service",
        API_VERSION="1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        # Served from the swagger-ui-bundle package, so /docs works without internet access.
        OPENAPI_SWAGGER_UI_URL="/docs/assets/",
    )
    app.extensions["simsvc"] = service

    @app.route("/docs/assets/<path:filename>")
    def swagger_assets(filename: str):  # noqa: ANN202 - a static file response
        return send_from_directory(swagger_ui_path, filename, max_age=86400)

    api = Api(app)
    api.register_blueprint(blp)
    register_error_handlers(app)  # after Api(), so these handlers win over flask-smorest's

    if settings.warm_on_start:
        service.registry.start()
    return app
