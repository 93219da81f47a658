"""Access control: bearer tokens for writes (admin or per endpoint), optional for queries."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from flask import Flask
from flask.testing import FlaskClient

from bench import demo
from service.core.config import Settings
from tests.helpers import upload, wait_job, wait_serving

ADMIN = "admin-" + "a" * 26
FOOD = "food-" + "f" * 27
QUERY = "query-" + "q" * 26


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def locked(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app(admin_token=ADMIN, endpoint_tokens=json.dumps({"food": FOOD})).test_client()


def test_training_needs_a_token(locked: FlaskClient, photos_zip: Path) -> None:
    missing = locked.post("/food/train", data={"file": upload(photos_zip)})
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = locked.post("/food/train", data={"file": upload(photos_zip)}, headers=bearer("x" * 32))
    assert wrong.status_code == 403
    basic = locked.post(
        "/food/train", data={"file": upload(photos_zip)}, headers={"Authorization": "Basic abc"}
    )
    assert basic.status_code == 401
    assert (
        locked.post("/food/train", data={"file": upload(photos_zip)}, headers=bearer(ADMIN)).status_code
        == 202
    )


def test_an_endpoint_token_works_on_its_endpoint_only(locked: FlaskClient, photos_zip: Path) -> None:
    ok = locked.post("/food/train", data={"file": upload(photos_zip)}, headers=bearer(FOOD))
    assert ok.status_code == 202
    other = locked.post("/fashion/train", data={"file": upload(photos_zip)}, headers=bearer(FOOD))
    assert other.status_code == 403
    assert (
        locked.post(
            "/train", data={"endpoint": "fashion", "file": upload(photos_zip)}, headers=bearer(FOOD)
        ).status_code
        == 403
    )
    assert wait_job(locked, ok.get_json()["status_url"])["status"] == "succeeded"


def test_uploads_rollbacks_and_deletes_need_a_token(locked: FlaskClient, photos_zip: Path) -> None:
    versions = []
    for _ in range(2):
        response = locked.post(
            "/food/train", data={"file": upload(photos_zip), "fine_tune": "never"}, headers=bearer(ADMIN)
        )
        versions.append(wait_job(locked, response.get_json()["status_url"])["version"])
    assert locked.post("/food/uploads").status_code == 401
    assert locked.post("/food/uploads", headers=bearer(FOOD)).status_code == 409  # allowed; local store

    assert locked.post("/food/rollback", json={"version": versions[0]}).status_code == 401
    assert (
        locked.post("/food/rollback", json={"version": versions[0]}, headers=bearer(QUERY)).status_code == 403
    )
    rolled = locked.post("/food/rollback", json={"version": versions[0]}, headers=bearer(FOOD))
    assert rolled.status_code == 200 and rolled.get_json()["current"] == versions[0]
    wait_serving(locked, "food", versions[0])

    assert locked.delete(f"/food/versions/{versions[1]}").status_code == 401
    current = locked.delete(f"/food/versions/{versions[0]}", headers=bearer(ADMIN))
    assert current.status_code == 409  # never the current version
    deleted = locked.delete(f"/food/versions/{versions[1]}", headers=bearer(ADMIN))
    assert deleted.status_code == 200
    assert [v["version"] for v in deleted.get_json()["versions"]] == [versions[0]]
    assert locked.delete(f"/food/versions/{versions[1]}", headers=bearer(ADMIN)).status_code == 404


def test_queries_are_open_unless_a_query_token_is_set(
    make_app: Callable[..., Flask], photos_zip: Path
) -> None:
    client = make_app(admin_token=ADMIN, query_token=QUERY).test_client()
    started = client.post(
        "/food/train", data={"file": upload(photos_zip), "fine_tune": "never"}, headers=bearer(ADMIN)
    )
    job = wait_job(client, started.get_json()["status_url"], headers=bearer(QUERY))
    assert job["status"] == "succeeded"
    photo = demo.jpeg(demo.photo("coffee"))
    assert client.post("/food/infer", data=photo, content_type="image/jpeg").status_code == 401
    assert (
        client.post(
            "/food/infer", data=photo, content_type="image/jpeg", headers=bearer("z" * 32)
        ).status_code
        == 403
    )
    assert client.get("/food", headers=bearer("z" * 32)).status_code == 403
    assert client.get("/endpoints").status_code == 401
    assert client.get("/health").status_code == 200  # the load balancer's check stays open
    assert client.get("/openapi.json").status_code == 200
    deadline = time.monotonic() + 30
    while client.get("/food", headers=bearer(QUERY)).get_json()["version"] != job["version"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    answer = client.post("/food/infer?k=1", data=photo, content_type="image/jpeg", headers=bearer(QUERY))
    assert answer.status_code == 200
    assert (
        client.post("/food/infer", data=photo, content_type="image/jpeg", headers=bearer(ADMIN)).status_code
        == 200
    )

    # Image URLs carry a signature, so a browser can show them without the header.
    url = answer.get_json()["results"][0]["image_url"]
    assert "sig=" in url and "expires=" in url
    params = parse_qs(urlparse(url).query)
    with client.get(url) as image:
        assert image.status_code == 200 and image.mimetype == "image/jpeg"
        # Cached no longer than the signature lasts (not the day a versioned URL gets).
        lasts = int(params["expires"][0]) - int(time.time())
        assert image.cache_control.private and 0 < image.cache_control.max_age <= lasts
    tampered = url.replace(params["sig"][0], "0" * len(params["sig"][0]))
    assert client.get(tampered).status_code == 401
    item = answer.get_json()["results"][0]["id"]
    other_item = url.replace(f"/items/{item}/", f"/items/{(item + 1) % 30}/")  # a signature is per item
    assert client.get(other_item).status_code == 401
    expired = url.replace(f"expires={params['expires'][0]}", f"expires={int(time.time()) - 5}")
    assert client.get(expired).status_code == 401


def test_tokens_never_reach_the_logs_or_the_answers(
    locked: FlaskClient, photos_zip: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "not-the-token-" + "s" * 20
    answers = [
        locked.post("/food/train", data={"file": upload(photos_zip)}, headers=bearer(secret)),
        locked.post("/food/train", data={"file": upload(photos_zip)}, headers=bearer(ADMIN)),
    ]
    wait_job(locked, answers[1].get_json()["status_url"])
    for response in answers:
        assert secret.encode() not in response.data and ADMIN.encode() not in response.data
    for record in caplog.records:
        assert secret not in record.getMessage() and ADMIN not in record.getMessage()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"admin_token": "short"}, "too short"),
        ({"endpoint_tokens": "{not json"}, "ENDPOINT_TOKENS must be a JSON object"),
        ({"endpoint_tokens": json.dumps({"shoes": "s" * 20})}, "unknown endpoints: shoes"),
        ({"endpoint_tokens": json.dumps({"food": ""})}, "non-empty strings"),
    ],
)
def test_bad_token_settings_stop_the_start(
    make_app: Callable[..., Flask], overrides: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_app(**overrides)


def test_the_aws_profile_never_runs_with_open_writes() -> None:
    with pytest.raises(ValueError, match="needs ADMIN_TOKEN"):
        Settings.load(environ={"SERVICE_PROFILE": "aws", "STORAGE_URI": "s3://bucket/x"})
    assert Settings.load(environ={"SERVICE_PROFILE": "aws", "STORAGE_URI": "s3://b/x", "ADMIN_TOKEN": ADMIN})


def test_a_malformed_image_signature_is_no_credential_and_never_a_500(make_app: Callable[..., Flask]) -> None:
    client = make_app(admin_token=ADMIN, query_token=QUERY).test_client()
    url = "/food/items/0/image?version=v&expires=9999999999&sig=%C3%A9"
    assert client.get(url).status_code == 401  # the token is checked first: a bad signature is none
    assert client.get(url, headers=bearer(QUERY)).status_code == 422


def test_the_token_is_checked_before_a_body_is_read(locked: FlaskClient) -> None:
    assert (
        locked.post("/food/rollback", data=b"{not json", content_type="application/json").status_code == 401
    )
    assert locked.post("/train", data={"endpoint": "food"}).status_code == 401
    big = b"{" + b" " * (2 * 1024 * 1024) + b"}"
    assert (
        locked.post(
            "/food/rollback", data=big, content_type="application/json", headers=bearer(ADMIN)
        ).status_code
        == 413
    )  # routes without uploads take 1 MB


def test_a_query_token_alone_would_leave_writes_open(make_app: Callable[..., Flask]) -> None:
    with pytest.raises(ValueError, match="would leave writes open"):
        make_app(query_token=QUERY)
