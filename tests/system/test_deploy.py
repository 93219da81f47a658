"""What Elastic Beanstalk runs: the CloudFormation template, the source bundle served by its own
Procfile command, and the worker tier's flow (moto's S3 and SQS over real HTTP)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from bench import demo
from service.core.config import ROOT
from service.core.errors import EncoderUnavailableError
from tests.helpers import (
    SQSD_HEADERS,
    ModelServer,
    S3Server,
    Tier,
    cli,
    make_zip,
    procfile_server,
    upload,
    wait_job,
    wait_serving,
)


def test_the_template_passes_cfn_lint() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("cfn-lint")), "infra/cloudformation.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the source bundle ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "bundle.zip"
    subprocess.run([sys.executable, "infra/bundle.py", "--out", str(out)], cwd=ROOT, check=True, timeout=120)
    return out


def test_the_bundle_holds_what_eb_needs_and_nothing_ignored(bundle: Path) -> None:
    with zipfile.ZipFile(bundle) as zf:
        names = zf.namelist()
    for needed in (
        "Procfile",
        "requirements.txt",
        "service/__init__.py",
        "service/server/gunicorn_conf.py",
        "endpoints/fashion.toml",
        ".ebextensions/01-service.config",
        ".platform/nginx/conf.d/simsvc.conf",
        "service/api/static/index.html",  # the web page and its files
        "service/api/static/style.css",
        *(f"service/api/static/{m.name}" for m in (ROOT / "service/api/static").glob("*.js")),
    ):
        assert needed in names, needed
    for unwanted in (".venv/", "models/", "data/", "cache/", "tests/", "dist/", "__pycache__"):
        assert not any(n.startswith(unwanted) or unwanted in n for n in names), unwanted


def test_the_procfile_command_serves_from_the_unpacked_bundle(
    bundle: Path, tmp_path: Path, models_dir: Path, photos_zip: Path
) -> None:
    app_dir = tmp_path / "app"
    with zipfile.ZipFile(bundle) as zf:
        zf.extractall(app_dir)
    # An endpoint that only this copy has: proof the server runs the bundle's code and files.
    (app_dir / "endpoints" / "bundled.toml").write_text('[encoder]\nsource = "offline"\ninput_size = 160\n')
    env = {"WEB_CONCURRENCY": "1", "MODELS_DIR": str(models_dir)}
    with procfile_server(tmp_path, env, app_dir=app_dir) as server:
        url = server.url
        names = [e["name"] for e in requests.get(f"{url}/endpoints", timeout=10).json()["endpoints"]]
        assert names == ["bundled", "fashion", "food"]
        job = requests.post(
            f"{url}/bundled/train",
            files={"file": ("p.zip", photos_zip.read_bytes())},
            data={"fine_tune": "never"},
            timeout=30,
        ).json()
        while (status := requests.get(job["status_url"], timeout=10).json())["status"] not in (
            "succeeded",
            "failed",
        ):
            time.sleep(0.2)
        assert status["status"] == "succeeded", status
        while requests.get(f"{url}/bundled", timeout=10).json()["version"] != status["version"]:
            time.sleep(0.2)
        found = requests.post(
            f"{url}/bundled/infer?k=1",
            data=demo.jpeg(demo.photo("moon")),
            headers={"Content-Type": "image/jpeg"},
            timeout=30,
        ).json()
        assert found["results"][0]["name"] == "moon/moon-original.jpg"
        page = requests.get(f"{url}/", timeout=10)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        assert requests.get(f"{url}/static/app.js", timeout=10).status_code == 200


# --- the worker tier ---------------------------------------------------------------------------------


@pytest.fixture
def tier(s3_server: S3Server, make_app: Callable[..., Flask], tmp_path: Path) -> Iterator[Tier]:
    yield Tier(s3_server, make_app, tmp_path, attempts=2)


def test_the_web_tier_queues_and_the_worker_tier_trains(tier: Tier, photos_zip: Path) -> None:
    response = tier.web.post("/food/train", data={"file": upload(photos_zip), "fine_tune": "never"})
    assert response.status_code == 202
    status_url = response.get_json()["status_url"]
    queued = tier.web.get(status_url).get_json()
    assert queued["status"] == "queued" and queued["source"].endswith(f"/uploads/food/{queued['id']}.zip")

    delivered = tier.deliver()
    assert delivered is not None and delivered.status_code == 200, delivered.get_json()
    job = tier.web.get(status_url).get_json()  # answered by the web tier, from the store
    assert job["status"] == "succeeded" and job["counts"]["images"] == 30
    wait_serving(tier.web, "food", job["version"])
    body = tier.web.post("/food/infer?k=1", data=demo.jpeg(demo.photo("rocket")), content_type="image/jpeg")
    assert body.get_json()["results"][0]["name"] == "rocket/rocket-original.jpg"
    assert tier.deliver() is None  # the message was deleted


def test_a_failing_job_ends_failed_with_its_reason(tier: Tier) -> None:
    response = tier.web.post("/food/train", data={"file": upload(make_zip({"notes.txt": b"no images"}))})
    delivered = tier.deliver()
    assert delivered.status_code == 200  # bad input: failed for good, not retried
    job = tier.web.get(response.get_json()["status_url"]).get_json()
    assert job["status"] == "failed" and "no usable image" in job["error"]
    assert tier.deliver() is None


def test_a_job_that_keeps_failing_is_retried_then_dead_lettered(
    s3_server: S3Server, make_app: Callable[..., Flask], tmp_path: Path, photos_zip: Path
) -> None:
    # The worker cannot get its encoder: nothing is mirrored (a transient, retryable failure).
    tier = Tier(s3_server, make_app, tmp_path, attempts=2, encoder_mode="mirror")
    response = tier.web.post("/food/train", data={"file": upload(photos_zip)})
    status_url = response.get_json()["status_url"]

    first = tier.deliver()
    assert first.status_code == 503
    job = tier.web.get(status_url).get_json()
    assert job["status"] == "queued" and job["error"].startswith("attempt 1 of 2 failed, will retry")

    second = tier.deliver()
    assert second.status_code == 503
    job = tier.web.get(status_url).get_json()
    assert job["status"] == "failed" and job["error"].startswith("gave up after 2 attempts")
    assert "not mirrored" in job["error"]

    assert tier.deliver() is None  # over maxReceiveCount: SQS moved it to the dead-letter queue
    dead = tier.sqs.receive_message(QueueUrl=tier.dlq, WaitTimeSeconds=1).get("Messages", [])
    assert len(dead) == 1 and job["id"] in dead[0]["Body"]


def test_the_worker_route_takes_only_the_local_sqs_daemon(tier: Tier) -> None:
    body = '{"job_id": "0123456789abcdef"}'
    outside = tier.worker.post(
        "/worker/jobs", data=body, environ_base={"REMOTE_ADDR": "10.0.0.8"}, headers=SQSD_HEADERS
    )
    assert outside.status_code == 403
    proxied = tier.worker.post(
        "/worker/jobs",
        data=body,
        environ_base={"REMOTE_ADDR": "127.0.0.1"},
        headers={**SQSD_HEADERS, "X-Forwarded-For": "203.0.113.9"},
    )
    assert proxied.status_code == 403
    browser = tier.worker.post(
        "/worker/jobs",
        data=body,
        environ_base={"REMOTE_ADDR": "127.0.0.1"},
        headers={"Content-Type": "application/json"},
    )
    assert browser.status_code == 403
    assert tier.web.post("/worker/jobs", data=body, headers=SQSD_HEADERS).status_code == 404
    bad = tier.worker.post(
        "/worker/jobs", data="{}", environ_base={"REMOTE_ADDR": "127.0.0.1"}, headers=SQSD_HEADERS
    )
    assert bad.status_code == 422


# --- training from a zip already in S3 ---------------------------------------------------------------


@pytest.fixture
def s3_client(make_app: Callable[..., Flask], s3_config: dict[str, Any]) -> FlaskClient:
    return make_app(**s3_config).test_client()


def test_a_presigned_upload_then_train_from_its_source(s3_client: FlaskClient, photos_zip: Path) -> None:
    upload_info = s3_client.post("/food/uploads").get_json()
    assert upload_info["method"] == "PUT" and "X-Amz-Signature" in upload_info["upload_url"]
    put = requests.put(upload_info["upload_url"], data=photos_zip.read_bytes(), timeout=30)
    assert put.status_code == 200
    response = s3_client.post("/food/train", json={"source": upload_info["source"], "fine_tune": "never"})
    assert response.status_code == 202, response.get_json()
    job = wait_job(s3_client, response.get_json()["status_url"])
    assert job["status"] == "succeeded" and job["counts"]["images"] == 30


@pytest.mark.parametrize(
    ("source", "status"),
    [
        ("s3://somebody-elses-bucket/catalog.zip", 403),
        ("s3://{bucket}/simsvc/uploads/fashion/theirs.zip", 403),  # another endpoint's uploads
        ("s3://{bucket}/simsvc/food/CURRENT", 403),  # the store itself
        ("s3://{bucket}/simsvc/uploads/food/missing.zip", 422),
        ("https://example.com/catalog.zip", 422),
        (42, 422),
    ],
)
def test_sources_outside_the_bucket_or_missing_are_refused(
    s3_client: FlaskClient, s3_config: dict[str, Any], source: Any, status: int
) -> None:
    bucket = s3_config["storage_uri"].split("/")[2]
    if isinstance(source, str):
        source = source.format(bucket=bucket)
    response = s3_client.post("/food/train", json={"source": source})
    assert response.status_code == status, response.get_json()
    assert response.get_json()["code"] == status


def test_sources_and_uploads_need_s3_storage(client: FlaskClient) -> None:
    assert client.post("/food/uploads").status_code == 409
    assert client.post("/food/train", json={"source": "s3://b/k.zip"}).status_code == 409


# --- the encoder mirror ------------------------------------------------------------------------------


def test_mirrored_encoders_load_from_the_bucket_without_tf_hub(
    model_server: ModelServer, s3_config: dict[str, Any], tmp_path: Path, models_dir: Path
) -> None:
    endpoints = tmp_path / "endpoints"
    endpoints.mkdir()
    (endpoints / "tiny.toml").write_text(f'[encoder]\nsource = "{model_server.url}"\ninput_size = 32\n')
    env = {
        **os.environ,
        "STORAGE_URI": s3_config["storage_uri"],
        "S3_ENDPOINT_URL": s3_config["s3_endpoint_url"],
        "ENDPOINTS_DIR": str(endpoints),
        "ENCODER_MODE": "hub",
        "CACHE_DIR": str(tmp_path / "connected"),
    }
    mirrored = cli("encoders", "mirror", env=env)
    assert mirrored.returncode == 0, mirrored.stderr
    assert "tiny: http://127.0.0.1" in mirrored.stdout and "/encoders/" in mirrored.stdout

    model_server.stop()  # from now on the handle cannot be downloaded
    from service import encoders
    from service.storage import open_storage

    store = open_storage(s3_config["storage_uri"], endpoint_url=s3_config["s3_endpoint_url"])
    source = encoders.EncoderSource("mirror", model_server.url, 32)
    encoder = encoders.load(source, tmp_path / "fresh-instance", store)
    assert encoder.encode(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 16)

    missing = encoders.EncoderSource("mirror", "https://tfhub.dev/google/never/mirrored/1", 224)
    with pytest.raises(EncoderUnavailableError, match="is not mirrored"):
        encoders.load(missing, tmp_path / "fresh-instance", store)


def test_the_template_alarms_on_5xx_latency_dead_letters_and_degraded_endpoints() -> None:
    from cfnlint.decode import cfn_yaml

    template = cfn_yaml.load(str(ROOT / "infra" / "cloudformation.yaml"))
    alarms = [
        r["Properties"] for r in template["Resources"].values() if r["Type"] == "AWS::CloudWatch::Alarm"
    ]

    def watched(alarm: dict) -> set[str]:
        names = {alarm.get("MetricName")}
        names |= {
            m["MetricStat"]["Metric"]["MetricName"] for m in alarm.get("Metrics", []) if "MetricStat" in m
        }
        return names

    every = set().union(*(watched(a) for a in alarms))
    assert {"ApplicationRequests5xx", "ApplicationLatencyP99", "ApproximateNumberOfMessagesVisible"} <= every
    assert "DegradedEndpoints" in every
    assert all(a["AlarmActions"] for a in alarms)


def test_the_worker_tier_scales_on_queue_depth_and_never_scales_in_while_a_message_runs() -> None:
    from cfnlint.decode import cfn_yaml

    resources = cfn_yaml.load(str(ROOT / "infra" / "cloudformation.yaml"))["Resources"]
    high, idle = resources["QueueBacklogHigh"]["Properties"], resources["QueueIdle"]["Properties"]
    assert high["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert high["Dimensions"][0]["Value"] == {"Fn::GetAtt": ["JobQueue", "QueueName"]}
    assert high["AlarmActions"] == [{"Ref": "WorkerScaleOut"}]
    # Scale-in only when nothing waits AND nothing is in flight (a shard or a reducer at work).
    measured = {m["MetricStat"]["Metric"]["MetricName"] for m in idle["Metrics"] if "MetricStat" in m}
    assert measured == {"ApproximateNumberOfMessagesVisible", "ApproximateNumberOfMessagesNotVisible"}
    assert idle["AlarmActions"] == [{"Ref": "WorkerScaleIn"}]
    for policy in ("WorkerScaleOut", "WorkerScaleIn"):
        group = resources[policy]["Properties"]["AutoScalingGroupName"]
        assert group == {"Fn::GetAtt": ["WorkerGroup", "Name"]}  # the worker environment's group
    settings = {
        (o["Namespace"], o["OptionName"]): o["Value"]
        for o in resources["WorkerEnvironment"]["Properties"]["OptionSettings"]
    }
    assert settings[("aws:autoscaling:asg", "MinSize")] == {"Ref": "WorkerMinInstances"}
    assert settings[("aws:autoscaling:asg", "MaxSize")] == {"Ref": "WorkerMaxInstances"}
    assert settings[("aws:elasticbeanstalk:application:environment", "JOB_QUEUE_URL")] == {"Ref": "JobQueue"}
