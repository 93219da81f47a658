"""What the tests share: real photos and zips, a local S3 server, app settings on temporary folders,
polling for jobs, the CLI and the Procfile's server as real subprocesses. Imported by the tests,
never by conftest's fixtures alone (tests/conftest.py holds only fixtures)."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import requests
from flask import Flask
from flask.testing import FlaskClient

from bench import demo
from service.catalog.rows import Catalog
from service.catalog.segment import Segment
from service.catalog.view import View
from service.core.config import ROOT
from service.encoders import OFFLINE_NAME
from service.storage.blobs import ref_of
from service.storage.manifest import BlobRef, Manifest, SegmentRef
from service.training.stage import Stager

ERROR_KEYS = {"code", "status", "message"}  # every error answer's JSON
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


@functools.cache
def converted_seed() -> Path | None:
    """The offline encoder converted to TFLite (5 s of CPU each time otherwise), kept under the
    repository's cache/ between runs like any instance's conversion cache (checked by its sha256
    before each use); None when the encoder is not built."""
    if not (ROOT / "models" / OFFLINE_NAME / "saved_model.pb").is_file():
        return None
    from service.encoders import convert, load, offline_source

    folder = ROOT / "cache" / "test-conversions"
    convert.converted_file(load(offline_source(ROOT / "models"), folder / "tfhub"), folder)
    return folder / "converted"


def seed_cache(cache_dir: Path) -> Path:
    """A cache folder holding the offline encoder's conversion already, as on an instance that
    converted it before: copies (a test may tamper with its own), never links. Tests of the
    conversion itself use cache folders of their own."""
    seed = converted_seed()
    if seed is not None:
        target = cache_dir / "converted"
        target.mkdir(parents=True, exist_ok=True)
        for made in seed.glob("*.tflite*"):
            if not (target / made.name).exists():
                shutil.copyfile(made, target / made.name)
    return cache_dir


def settings_for(tmp: Path, models: Path, **extra: Any) -> dict[str, Any]:
    return {
        "storage_uri": f"file://{tmp / 'store'}",
        "cache_dir": seed_cache(tmp / "cache"),
        "models_dir": models,
        "watch_interval_s": 0.2,
        # Jobs in a thread: a child process per job would cost each of the suite's ~100 jobs a
        # TensorFlow import. The child-process path has its own tests (test_runtime_lite.py).
        "train_in_child": False,
        # Fusing a head costs each fine-tuned train a conversion of the encoder (seconds); the
        # fused path has its own tests (tests/training/test_fuse.py).
        "fuse_head": False,
        **extra,
    }


def upload(path_or_bytes: Path | bytes, filename: str = "upload.zip") -> tuple[io.BytesIO, str]:
    data = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    return io.BytesIO(data), filename


def wait_job(
    client: FlaskClient, status_url: str, timeout: float = 120, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(status_url, headers=headers).get_json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
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
    if env.get("CACHE_DIR"):
        seed_cache(Path(env["CACHE_DIR"]))
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


def submit(client: FlaskClient, path: str, data: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, data=data)
    assert response.status_code == 202, response.get_json()
    job = wait_job(client, response.get_json()["status_url"])
    assert job["status"] == "succeeded", job
    return job


def photo_jpeg(name: str, size: tuple[int, int] | None = None, quality: int = 90) -> bytes:
    image = demo.photo(name)
    return demo.jpeg(image.resize(size) if size else image, quality)


def assert_error(response: Any, status: int, *fragments: str) -> dict[str, Any]:
    body = response.get_json()
    assert response.status_code == status, body
    assert ERROR_KEYS <= set(body) and body["code"] == status
    for fragment in fragments:
        assert fragment in body["message"] or fragment in json.dumps(body.get("errors", {}))
    return body


# --- versions made by hand, for the store's tests ---------------------------------------------


def files(folder: Path, tag: str) -> dict[str, tuple[Path, BlobRef]]:
    """A segment's parts, as small files whose bytes say which version made them."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for part in ("vectors", "items", "names", "entries"):
        path = folder / part
        path.write_bytes(f"{tag}:{part}".encode())
        out[part] = (path, ref_of(path))
    return out


def manifest_of(version: str, parts: dict[str, tuple[Path, BlobRef]], lineage: str | None = None) -> Manifest:
    segment = SegmentRef("seg-" + version[-6:], 1, 1, {name: ref for name, (_, ref) in parts.items()})
    return Manifest(
        endpoint="shop",
        version=version,
        created_at="2026-01-01T00:00:00+00:00",
        lineage=lineage or version,
        base=None,
        encoder={"fingerprint": "f"},
        runtime={"name": "tensorflow"},
        dim=2,
        metric="angular",
        n_trees=1,
        search_k=0,
        count=1,
        rows=1,
        next_id=1,
        labels={},
        segments=(segment,),
    )


# --- the Procfile's web command, as Elastic Beanstalk runs it --------------------------------------


def procfile_web_command(app_dir: Path = ROOT) -> list[str]:
    for line in (app_dir / "Procfile").read_text().splitlines():
        if line.startswith("web:"):
            return shlex.split(line[len("web:") :])
    raise AssertionError("Procfile has no web: line")


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def workers(self) -> set[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        return {int(pid) for pid in children.split()}

    def versions_by_worker(self, endpoint: str, until: str, timeout: float = 60) -> dict[int, str]:
        """Ask /health until every worker has answered with version `until` (or time runs out)."""
        seen: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        with ThreadPoolExecutor(8) as pool:
            while time.monotonic() < deadline:
                answers = pool.map(lambda _: requests.get(f"{self.url}/health", timeout=10).json(), range(8))
                for body in answers:
                    seen[body["worker"]] = body["endpoints"][endpoint]
                if set(seen) >= self.workers() and all(v == until for v in seen.values()):
                    break
                time.sleep(0.1)
        return seen


@contextmanager
def procfile_server(tmp: Path, env: dict[str, str], app_dir: Path = ROOT) -> Iterator[Server]:
    """Run the Procfile's web command from `app_dir` with the venv's gunicorn; stop it afterwards."""
    port = free_port()
    full_env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # the venv's gunicorn
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "STORAGE_URI": f"file://{tmp / 'store'}",
        "CACHE_DIR": str(tmp / "cache"),
        **env,
    }
    seed_cache(Path(full_env["CACHE_DIR"]))
    full_env.pop("PYTHONPATH", None)  # import the service from app_dir, nothing else
    log = tmp / "gunicorn.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            procfile_web_command(app_dir), cwd=app_dir, env=full_env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or a busy machine
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gunicorn did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Server(url, process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


SQSD_HEADERS = {"User-Agent": "aws-sqsd/3.0.4", "Content-Type": "application/json"}


class Tier:
    """A web app and a worker app on one S3 bucket and SQS queue (with a dead-letter queue)."""

    def __init__(
        self,
        server: S3Server,
        make_app: Callable[..., Flask],
        tmp_path: Path,
        attempts: int,
        **worker_config: Any,
    ) -> None:
        self.sqs = boto3.client("sqs", endpoint_url=server.url)
        name = f"jobs-{os.urandom(4).hex()}"
        dlq = self.sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
        dlq_arn = self.sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        self.queue = self.sqs.create_queue(
            QueueName=name,
            Attributes={
                "RedrivePolicy": f'{{"deadLetterTargetArn": "{dlq_arn}", "maxReceiveCount": "{attempts}"}}'
            },
        )["QueueUrl"]
        self.dlq = dlq
        self.store = store = {"storage_uri": f"s3://{server.bucket()}/simsvc", "s3_endpoint_url": server.url}
        self.web = make_app(
            **store,
            job_queue_url=self.queue,
            sqs_endpoint_url=server.url,
            cache_dir=seed_cache(tmp_path / "web-cache"),
        ).test_client()
        self.make_worker = lambda name: make_app(
            **store,
            service_role="worker",
            job_queue_url=self.queue,  # a worker queues the shards of a job it splits
            sqs_endpoint_url=server.url,
            job_max_attempts=attempts,
            warm_on_start=False,
            cache_dir=seed_cache(tmp_path / name),  # converted already, as on a used instance
            **worker_config,
        ).test_client()
        self.worker = self.make_worker("worker-cache")

    def deliver_all(self, limit: int = 1000) -> list[Any]:
        """Deliver messages until the queue is empty (a sharded job queues its shards)."""
        answers = []
        while len(answers) < limit and (answer := self.deliver()) is not None:
            answers.append(answer)
        return answers

    def receive(self, visibility_s: int = 0) -> dict[str, Any] | None:
        got = self.sqs.receive_message(
            QueueUrl=self.queue,
            MaxNumberOfMessages=1,
            WaitTimeSeconds=1,
            VisibilityTimeout=visibility_s,
            AttributeNames=["ApproximateReceiveCount"],
        )
        messages = got.get("Messages", [])
        return messages[0] if messages else None

    def deliver(self, message: dict[str, Any] | None = None, worker: Any = None) -> requests.Response | None:
        """Receive one message (or take `message`) and POST it to the worker as the SQS daemon
        does; delete it on 200."""
        message = message or self.receive()
        if message is None:
            return None
        response = (worker or self.worker).post(
            "/worker/jobs",
            data=message["Body"],
            environ_base={"REMOTE_ADDR": "127.0.0.1"},
            headers={
                **SQSD_HEADERS,
                "X-Aws-Sqsd-Msgid": message["MessageId"],
                "X-Aws-Sqsd-Receive-Count": message["Attributes"]["ApproximateReceiveCount"],
            },
        )
        if response.status_code == 200:
            self.sqs.delete_message(QueueUrl=self.queue, ReceiptHandle=message["ReceiptHandle"])
        return response


class Sqsd:
    """A stand-in for Elastic Beanstalk's SQS daemon: threads receive messages and POST each to a
    worker's /worker/jobs with the daemon's headers; a 200 deletes the message, anything else (a
    dropped connection too) leaves it to SQS, which delivers it again after the visibility timeout
    and dead-letters it after maxReceiveCount."""

    def __init__(self, sqs: Any, queue: str, url: str, threads: int = 2, visibility_s: int = 5) -> None:
        self.sqs, self.queue, self.url = sqs, queue, url
        self.visibility_s = visibility_s
        self.posted: list[tuple[dict[str, Any], int]] = []  # (message, status; 0: no answer)
        self._stop = False
        self._pool = ThreadPoolExecutor(threads)
        self._loops = [self._pool.submit(self._loop) for _ in range(threads)]

    def _loop(self) -> None:
        while not self._stop:
            got = self.sqs.receive_message(
                QueueUrl=self.queue,
                MaxNumberOfMessages=1,
                WaitTimeSeconds=1,
                VisibilityTimeout=self.visibility_s,
                AttributeNames=["ApproximateReceiveCount"],
            )
            for message in got.get("Messages", []):
                status = 0
                try:
                    status = requests.post(
                        f"{self.url}/worker/jobs",
                        data=message["Body"],
                        headers={
                            **SQSD_HEADERS,
                            "X-Aws-Sqsd-Msgid": message["MessageId"],
                            "X-Aws-Sqsd-Queue": self.queue.rsplit("/", 1)[-1],
                            "X-Aws-Sqsd-Receive-Count": message["Attributes"]["ApproximateReceiveCount"],
                        },
                        timeout=300,
                    ).status_code
                except requests.RequestException:
                    pass  # the worker died: the message comes back after its visibility timeout
                self.posted.append((json.loads(message["Body"]), status))
                if status == 200:
                    try:
                        self.sqs.delete_message(QueueUrl=self.queue, ReceiptHandle=message["ReceiptHandle"])
                    except self.sqs.exceptions.ReceiptHandleIsInvalid:
                        pass  # delivered again meanwhile (past its visibility timeout): as sqsd, go on

    def stop(self) -> None:
        self._stop = True
        for loop in self._loops:
            loop.result(timeout=330)
        self._pool.shutdown()


def headless_rows(vectors: np.ndarray, first_id: int = 0, digests: list[str] | None = None) -> Catalog:
    """Rows of unit vectors with no head (the backbone's vectors are the served ones), one item
    each, ids from `first_id`, images named by their sha256 (`digests`, or made up from the ids)."""
    n = len(vectors)
    digests = digests or [f"{first_id + i:064x}" for i in range(n)]
    return Catalog(
        items=np.arange(first_id, first_id + n, dtype=np.int64),
        names=[f"x/{first_id + i}.jpg" for i in range(n)],
        entries=[{"label": "x", "metadata": {}, "image": f"images/{d}.jpg", "sha256": d} for d in digests],
        vectors=vectors,
        backbone=vectors,
        thumbs=np.zeros((n, 0), np.float32),
        mirrored=None,
        next_id=first_id + n,
    )


def staged_view(folder: Path, *parts: tuple[Catalog, int]) -> View:
    """A View (no manifest) of segments staged in `folder`, one per (rows, index_min_rows)."""
    stager = Stager(folder / "stage")
    refs = [stager.segment(rows, n_trees=8, head=False, index_min_rows=least) for rows, least in parts]
    paths = {blob.sha256: path for path, blob in stager.files}
    dim = parts[0][0].vectors.shape[1]
    return View(None, [Segment(ref, lambda blob, label: paths[blob.sha256], dim) for ref in refs])  # type: ignore[arg-type]
