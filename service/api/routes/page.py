"""The web page: `GET /` and its static files (service/api/static), for people rather than programs.

A plain Flask blueprint, not a flask-smorest one: the page is not part of the API, so it stays out
of /openapi.json. Everything it shows comes from the JSON routes, called by the page's own script.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, current_app, send_from_directory

from service.api.context import svc

STATIC = Path(__file__).resolve().parent.parent / "static"

# Its files under /static/ (a name no endpoint may take: service/core/endpoint.py RESERVED_NAMES).
blp = Blueprint("page", __name__, static_folder=str(STATIC), static_url_path="/static")

# Scripts and styles from this origin only (no inline script, no style attributes); images from
# here, from blob: URLs (the query photo's preview, images fetched with a token) and data: URLs.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:{images}; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    "require-trusted-types-for 'script'; trusted-types 'none'"
)


@blp.route("/")
def index() -> Response:
    """The page itself: public (it holds no data; the routes it calls check their tokens)."""
    response = send_from_directory(STATIC, "index.html", mimetype="text/html")
    response.headers["Content-Security-Policy"] = PAGE_CSP.format(images=_store_origin())
    return response


def _store_origin() -> str:
    """The store's origin where results' image URLs point into it (pre-signed S3 URLs), else ''."""
    cache = current_app.extensions.setdefault("simsvc.page", {})
    if "store_origin" not in cache:
        origin = svc().store_origin()
        if origin is None:
            return ""  # it cannot sign now, so results cannot point into it either: ask again later
        cache["store_origin"] = f" {origin}" if origin else ""
    return cache["store_origin"]
