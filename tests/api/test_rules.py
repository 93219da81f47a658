"""The declarative HTTP rules (service/api/rules.py) against what the server really answers:
every route that asks for a token documents 401 and 403, and every route that refuses a body as too
large documents 413; no route documents a token it does not ask for."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

ADMIN = "a" * 32
QUERY = "q" * 32
VALUES = {"name": "food", "item_id": "1", "photo": "0", "job_id": "0" * 16, "version": "v1"}
BIG = b"x" * (2 * 1024 * 1024)  # over every route's limit below (1 MB)


def operations(app: Flask) -> list[tuple[str, str, dict[str, Any]]]:
    spec = app.test_client().get("/openapi.json").get_json()
    found = []
    for path, methods in spec["paths"].items():
        url = re.sub(r"\{(\w+)\}", lambda m: VALUES[m.group(1)], path)
        for method, operation in methods.items():
            if method in ("get", "post", "put", "patch", "delete"):
                found.append((method, url, operation))
    return found


@pytest.fixture
def locked(make_app: Callable[..., Flask]) -> Flask:
    # Tokens for writes and for queries; uploads capped at 1 MB so a 2 MB body is over every limit.
    return make_app(
        admin_token=ADMIN, query_token=QUERY, max_upload_mb=1, max_image_mb=1, warm_on_start=False
    )


def test_every_route_that_asks_for_a_token_says_so(locked: Flask) -> None:
    client = locked.test_client()
    checked = 0
    for method, url, operation in operations(locked):
        answer = getattr(client, method)(url)
        documented = {"401", "403"} <= set(operation["responses"])
        if answer.status_code == 401:
            assert documented, f"{method.upper()} {url} answers 401 without listing 401 and 403"
            checked += 1
        else:
            assert "401" not in operation["responses"], (
                f"{method.upper()} {url} lists 401, answers {answer.status_code}"
            )
    assert checked >= 15  # every route but /health, /metrics... is protected here


def test_every_route_that_refuses_a_big_body_says_so(locked: Flask) -> None:
    client = locked.test_client()
    headers = {"Authorization": f"Bearer {ADMIN}"}
    refused = set()
    for method, url, operation in operations(locked):
        if method == "get":
            continue
        for content_type in ("application/json", "multipart/form-data; boundary=x", "image/jpeg"):
            answer = getattr(client, method)(url, data=BIG, headers={**headers, "Content-Type": content_type})
            if answer.status_code == 413:
                assert "413" in operation["responses"], f"{method.upper()} {url} answers 413 unlisted"
                refused.add(url)
    # The upload routes, and the JSON ones.
    assert {"/food/train", "/train", "/food/infer", "/food/items", "/food/rollback"} <= refused


def test_the_rules_are_on_the_views(locked: Flask) -> None:
    views = locked.view_functions
    assert views["queries.infer"].upload_limit_setting == "max_image_mb"
    assert views["training.train"].upload_limit_setting == "max_upload_mb"
    assert views["items.edit_item"].required_token == "write"
    assert views["queries.similar"].required_token == "query"
    assert not hasattr(views["endpoints.health"], "required_token")


def test_the_token_comes_before_a_bad_body_or_query_string(locked: Flask) -> None:
    # The order the decorators must keep: @requires right under @blp.route, above @blp.arguments.
    client = locked.test_client()
    assert client.post("/food/rollback", data=b"{nope", content_type="application/json").status_code == 401
    assert client.patch("/food/items/1", json={"label": 3}).status_code == 401
    assert client.delete("/food/items", json={"ids": "x"}).status_code == 401
    assert client.post("/food/infer?k=ten", data=b"x", content_type="image/jpeg").status_code == 401
    assert client.get("/food/items/1/similar?k=0").status_code == 401


def test_a_json_body_s_field_errors_name_the_field(locked: Flask) -> None:
    client = locked.test_client()
    headers = {"Authorization": f"Bearer {ADMIN}"}
    body = client.post("/food/rollback", json={"version": 1}, headers=headers).get_json()
    assert body["code"] == 422 and set(body["errors"]) == {"version"}  # flat, as every body's
    body = client.delete("/food/items", json={"ids": ["x"]}, headers=headers).get_json()
    assert body["code"] == 422 and set(body["errors"]) == {"ids"}
    body = client.post(
        "/food/rollback", data=b"[1]", content_type="application/json", headers=headers
    ).get_json()
    assert body["code"] == 422 and body["message"] == "the body must be a JSON object"
