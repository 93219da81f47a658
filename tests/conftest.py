"""Shared fixtures: real photos, a tiny SavedModel, apps on temporary folders, job polling."""

from __future__ import annotations

import http.server
import io
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from bench import demo
from service import create_app
from service.core.config import ROOT
from service.encoders import OFFLINE_NAME

# A handful of real photos keeps the suite fast; five variants each, one folder per photo.
TEST_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "colorwheel", "moon")

# boto3 needs credentials and a region; the local S3 server accepts any. Set before any client
# is made, and inherited by the subprocesses (CLI, gunicorn) the tests start.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
)
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_name, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 API served over real HTTP on loopback; can be stopped and started again.

    moto keeps its buckets in this process's memory, so a restarted server on the same port
    still has them: that is how the tests simulate an S3 outage.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: Any = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        # Close the listening socket too, so clients are refused at once (not left hanging).
        self._server.stop()
        self._server._server.server_close()

    def bucket(self) -> str:
        """A new, empty bucket with a valid DNS name."""
        import boto3

        name = f"simsvc-test-{secrets.token_hex(6)}"
        boto3.client("s3", endpoint_url=self.url).create_bucket(Bucket=name)
        return name

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_config(s3_server: S3Server) -> dict[str, Any]:
    """Settings that put the app's store in a fresh bucket on the shared S3 server."""
    return {"storage_uri": f"s3://{s3_server.bucket()}/simsvc", "s3_endpoint_url": s3_server.url}


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The offline encoder built by `make encoder` (built here if missing)."""
    models = ROOT / "models"
    if not (models / OFFLINE_NAME / "saved_model.pb").is_file():
        from service.encoders.offline import build

        models.mkdir(exist_ok=True)
        build(models)
    return models


@pytest.fixture(scope="session")
def photos_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.photos_zip(tmp_path_factory.mktemp("zips") / "photos.zip", TEST_PHOTOS)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real SavedModel (32x32 in, 16-d out) with a `__call__`, like TF-Hub's models."""
    from service.encoders import tfruntime

    tf = tfruntime.tensorflow()

    class Tiny(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal([48, 16], seed=[1, 2]))

        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
        def __call__(self, x: Any) -> Any:
            grid = tf.nn.avg_pool2d(x, ksize=8, strides=8, padding="VALID")  # [N, 4, 4, 3]
            return tf.matmul(tf.reshape(grid, [-1, 48]) - 0.5, self.w)

    path = tmp_path_factory.mktemp("tiny") / "tiny_model"
    tf.saved_model.save(Tiny(), str(path))
    return path


def settings_for(tmp: Path, models: Path, **extra: Any) -> dict[str, Any]:
    return {
        "storage_uri": f"file://{tmp / 'store'}",
        "cache_dir": tmp / "cache",
        "models_dir": models,
        "watch_interval_s": 0.2,
        # Jobs in a thread: a child process per job would cost each of the suite's ~100 jobs a
        # TensorFlow import. The child-process path has its own tests (test_runtime_lite.py).
        "train_in_child": False,
        **extra,
    }


@pytest.fixture
def make_app(tmp_path: Path, models_dir: Path) -> Iterator[Callable[..., Flask]]:
    """Build apps on this test's temporary folders; their background threads stop afterwards."""
    apps: list[Flask] = []

    def make(**config: Any) -> Flask:
        app = create_app(settings_for(tmp_path, models_dir, **config))
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["simsvc"].close()


@pytest.fixture
def client(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app().test_client()


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, photos_zip: Path
) -> Iterator[FlaskClient]:
    """A client whose `food` endpoint is trained on the test photos (shared by a module)."""
    app = create_app(settings_for(tmp_path_factory.mktemp("trained"), models_dir))
    client = app.test_client()
    job = train(client, "food", photos_zip)
    assert job["status"] == "succeeded", job
    wait_serving(client, "food", job["version"])
    yield client
    app.extensions["simsvc"].close()


def upload(path_or_bytes: Path | bytes, filename: str = "upload.zip") -> tuple[io.BytesIO, str]:
    data = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    return io.BytesIO(data), filename


def wait_job(
    client: FlaskClient, status_url: str, timeout: float = 120, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(status_url, headers=headers).get_json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job did not finish in {timeout}s: {job}")


def train(client: FlaskClient, endpoint: str, zip_path: Path | bytes) -> dict[str, Any]:
    response = client.post(f"/{endpoint}/train", data={"file": upload(zip_path)})
    assert response.status_code == 202, response.get_json()
    return wait_job(client, response.get_json()["status_url"])


def wait_serving(client: FlaskClient, endpoint: str, version: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get(f"/{endpoint}").get_json()["version"] == version:
            return
        time.sleep(0.05)
    raise AssertionError(f"{endpoint} did not switch to {version} in {timeout}s")


def cli(*args: str, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """`python -m service <args>` as a real subprocess (the CLI, exactly as a user runs it)."""
    command = [sys.executable, "-m", "service", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def make_zip(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return out.getvalue()


def copy_endpoints(target: Path, *names: str) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(ROOT / "endpoints" / f"{name}.toml", target)
    return target


class ModelServer:
    def __init__(self, server: http.server.ThreadingHTTPServer) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}/tiny.tar.gz"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def model_server(tiny_model: Path, tmp_path: Path) -> Iterator[ModelServer]:
    """A local HTTP server holding the tiny model as a TF-Hub style .tar.gz."""
    site = tmp_path / "site"
    site.mkdir()
    with tarfile.open(site / "tiny.tar.gz", "w:gz") as tar:
        for item in tiny_model.iterdir():
            tar.add(item, arcname=item.name)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    running = ModelServer(server)
    yield running
    if running.server.socket.fileno() != -1:
        running.stop()
