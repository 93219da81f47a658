"""The Flask app factory: settings -> service parts -> tokens -> routes, OpenAPI docs, error handlers."""

from __future__ import annotations

import logging
import math
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, current_app, g, request, send_from_directory
from flask.json.provider import DefaultJSONProvider
from flask_smorest import Api
from swagger_ui_bundle import swagger_ui_path

from service.api.auth import Tokens
from service.api.bodies import MB
from service.api.errors import register_error_handlers
from service.api.routes import BLUEPRINTS, page
from service.api.rules import EndpointName, cap_bodies
from service.application.wiring import build_service
from service.core import logs, metrics
from service.core.config import Settings
from service.core.errors import InvalidHostError

# Swagger UI starts itself with an inline script and styles; everything else needs nothing at all.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'"
)
API_CSP = "default-src 'none'; frame-ancestors 'none'"


def security_headers(response: Response) -> Response:
    """No content sniffing (an uploaded GIF/HTML polyglot stays an image), and a CSP on every answer."""
    response.headers["X-Content-Type-Options"] = "nosniff"
    docs = request.path == "/docs" or request.path.startswith("/docs/")
    response.headers.setdefault("Content-Security-Policy", DOCS_CSP if docs else API_CSP)
    return response


REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def host_name(host: str) -> str:
    """The name in a Host header, without its port: 'a.example:80' -> 'a.example', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def trusted(name: str, allowed: list[str]) -> bool:
    return any(name == a or (a.startswith(".") and (name.endswith(a) or name == a[1:])) for a in allowed)


def start_request() -> None:
    """A request id for every answer and log line: the caller's X-Request-ID (if sane), or new."""
    given = request.headers.get("X-Request-ID", "")
    g.request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
    g.started = time.perf_counter()
    logs.request_id.set(g.request_id)
    allowed = current_app.extensions["simsvc.hosts"]
    if allowed and not trusted(host_name(request.headers.get("Host", "")), allowed):
        raise InvalidHostError(
            f"this service does not answer to the host name {request.headers.get('Host', '')!r}"
        )


def finish_request(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.get("request_id", "")
    # Series are labelled by route as the API documents it: /<name>/infer, whatever the converter.
    route = request.url_rule.rule.replace("<endpoint:name>", "<name>") if request.url_rule else "unmatched"
    name = (request.view_args or {}).get("name", "")
    known = current_app.extensions["simsvc"].specs
    metrics.REQUESTS.labels(route, name if name in known else "", str(response.status_code)).inc()
    metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - g.get("started", time.perf_counter()))
    return response


def forget_request_id(exc: BaseException | None) -> None:
    logs.request_id.set(None)


class StrictJSONProvider(DefaultJSONProvider):
    """Standard JSON only: NaN and Infinity (which no strict parser reads) are written as null."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs.setdefault("allow_nan", False)
        try:
            return super().dumps(obj, **kwargs)
        except ValueError:
            return super().dumps(_finite(obj), **kwargs)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app. `config` overrides environment variables (tests pass their settings here)."""
    settings = Settings.load(config)
    service = build_service(settings)
    tokens = Tokens.from_settings(
        settings.admin_token,
        settings.endpoint_tokens,
        settings.query_token,
        list(service.specs),
        settings.signed_url_expiry_s,
    )

    app = Flask(__name__, static_folder=None)  # the page's files: routes/page.py
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
    app.extensions["simsvc.tokens"] = tokens

    @app.route("/docs/assets/<path:filename>")
    def swagger_assets(filename: str) -> Response:
        return send_from_directory(swagger_ui_path, filename, max_age=86400)

    if not settings.trusted_hosts and settings.profile == "aws":
        logging.getLogger(__name__).warning(
            "TRUSTED_HOSTS is empty: the Host header of each request builds the URLs it gets back; "
            "set it to the names clients use (e.g. .example.com)"
        )
    # The Host header builds every URL the service returns: only these names are answered.
    app.extensions["simsvc.hosts"] = [
        h.strip().strip("[]").lower() for h in settings.trusted_hosts.split(",") if h.strip()
    ]
    app.json = StrictJSONProvider(app)
    app.before_request(start_request)
    app.before_request(cap_bodies)
    app.after_request(security_headers)
    app.after_request(finish_request)
    app.teardown_request(forget_request_id)
    app.url_map.converters["endpoint"] = EndpointName
    api = Api(app)
    api.register_converter(EndpointName, lambda converter: EndpointName.SCHEMA)
    api.spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer"})
    for blueprint in BLUEPRINTS:
        api.register_blueprint(blueprint)
    app.register_blueprint(page.blp)  # GET / and its files: for people, so not in the API's description
    register_error_handlers(app)  # after Api(), so these handlers win over flask-smorest's

    if settings.warm_on_start:
        service.start()
    return app
