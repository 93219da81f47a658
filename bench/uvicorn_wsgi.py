"""gunicorn's uvicorn worker (httptools, a compiled HTTP parser) told the app is WSGI (Flask's two
arguments look like ASGI 2 to uvicorn's guess). Measured by bench/request_path.py only."""

from __future__ import annotations

from typing import Any

from uvicorn_worker import UvicornWorker


class WsgiUvicornWorker(UvicornWorker):  # type: ignore[misc]  # uvicorn_worker ships no types
    CONFIG_KWARGS: dict[str, Any] = {"loop": "auto", "http": "httptools", "interface": "wsgi"}
