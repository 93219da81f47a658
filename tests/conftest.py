"""Fixtures shared by every test folder: a local S3 server, the offline encoder, real photos, a tiny
SavedModel, apps on temporary folders. Helpers the tests call are in tests/helpers.py."""

from __future__ import annotations

import http.server
import tarfile
import threading
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
from tests.helpers import TEST_PHOTOS, ModelServer, S3Server, settings_for, train, wait_serving


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The system suites (tests/system: real servers, browsers, processes killed) are slow: `make
    test-fast` leaves them out with the others marked so."""
    system = ROOT / "tests" / "system"
    for item in items:
        if system in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)
