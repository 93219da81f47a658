"""Production signals: Prometheus metrics from every gunicorn worker, request ids, JSON log lines."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import make_zip, photo_jpeg, procfile_server


def families(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


@pytest.mark.slow
def test_metrics_count_the_requests_of_both_workers(tmp_path: Path, models_dir: Path) -> None:
    env = {"WEB_CONCURRENCY": "2", "MODELS_DIR": str(models_dir), "WATCH_INTERVAL_S": "0.5"}
    with procfile_server(tmp_path, env) as server:
        files = {f"photos/{n}.jpg": photo_jpeg(n) for n in ("coffee", "moon", "rocket")}
        posted = requests.post(
            f"{server.url}/food/train", files={"file": ("z.zip", make_zip(files))}, timeout=30
        )
        status_url = posted.json()["status_url"]
        deadline = time.monotonic() + 120
        while (job := requests.get(status_url, timeout=10).json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert job["status"] == "succeeded", job
        assert server.versions_by_worker("food", job["version"])  # both workers serve it
        sent = 0
        with requests.Session() as session:  # new connections spread over both workers
            for _ in range(40):
                answer = requests.post(
                    f"{server.url}/food/infer",
                    data=photo_jpeg("moon"),
                    headers={"Content-Type": "image/jpeg"},
                )
                assert answer.status_code == 200 and answer.headers["X-Request-ID"]
                sent += 1
            assert session.get(f"{server.url}/food/items/99999/similar").status_code == 404

        text = requests.get(f"{server.url}/metrics", timeout=10).text
        found = families(text)
        infer = [
            s
            for s in found["simsvc_requests"]
            if s.name == "simsvc_requests_total" and s.labels["route"] == "/<name>/infer"
        ]
        assert (
            sum(
                s.value
                for s in infer
                if s.labels == {"route": "/<name>/infer", "endpoint": "food", "status": "200"}
            )
            == sent
        )
        missing = [s for s in found["simsvc_requests"] if s.labels.get("status") == "404"]
        assert missing and missing[0].labels["endpoint"] == "food"
        # Per-worker gauges: each of the two workers says which version it serves (its creation
        # time: one series per worker and endpoint, however many versions come and go).
        from service.storage.versions import created_at

        serving = found["simsvc_served_version_created_seconds"]
        assert {s.value for s in serving} == {created_at(job["version"])}
        assert len({s.labels["pid"] for s in serving}) == 2
        assert (
            sum(s.value for s in found["simsvc_batch_images"] if s.name == "simsvc_batch_images_count") >= 1
        )
        assert any(s.value >= sent for s in found["simsvc_images_decoded"] if s.labels.get("outcome") == "ok")
        assert any(s.labels == {"kind": "train", "status": "succeeded"} for s in found["simsvc_jobs"])
        assert "simsvc_request_seconds" in found and "simsvc_encoder_seconds" in found
        # TensorFlow's start-up noise is gone from the server's log.
        assert "cuInit" not in server.log.read_text()


def test_metrics_need_the_query_token_when_one_is_set(make_app: Callable[..., Flask]) -> None:
    client = make_app(query_token="q" * 20, admin_token="a" * 20).test_client()
    assert client.get("/metrics").status_code == 401
    ok = client.get("/metrics", headers={"Authorization": "Bearer " + "q" * 20})
    assert ok.status_code == 200 and "simsvc_requests_total" in ok.get_data(as_text=True)


def test_every_answer_and_log_line_carries_the_request_id(make_app: Callable[..., Flask]) -> None:
    import io
    import logging

    client = make_app(log_format="json", warm_on_start=False).test_client()
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_simsvc", False))
    out = io.StringIO()
    handler.setStream(out)  # type: ignore[attr-defined]
    given = client.get("/food", headers={"X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"
    made = client.get("/health").headers["X-Request-ID"]
    assert len(made) == 32
    assert (
        client.get("/health", headers={"X-Request-ID": "bad id; <script>"}).headers["X-Request-ID"]
        != "bad id; <script>"
    )
    # A 503 is logged: as one JSON object with the request's id.
    client.post(
        "/food/infer", data=photo_jpeg("moon"), content_type="image/jpeg", headers={"X-Request-ID": "r-42"}
    )
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    logged = [line for line in lines if line["request_id"] == "r-42"]
    assert logged and logged[0]["level"] == "WARNING" and "no trained version" in logged[0]["message"]
