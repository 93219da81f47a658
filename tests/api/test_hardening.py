"""Hardening, second pass: each defect an attacker found, as a request that must now get a clear answer."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image

from bench import demo
from service.catalog import images
from service.core.config import ROOT
from tests.helpers import assert_error, make_zip, photo_jpeg, submit, upload


def png(image: Image.Image, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **params)
    return out.getvalue()


def scan_bomb(repeats: int = 200) -> bytes:
    """A small progressive JPEG whose last scan is repeated: each repeat is another decode pass."""
    out = io.BytesIO()
    demo.photo("coffee").save(out, format="JPEG", progressive=True, quality=80)
    data = out.getvalue()
    last_scan = data.rindex(b"\xff\xda")
    return data[:last_scan] + data[last_scan:-2] * repeats + b"\xff\xd9"


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def trained_client(app: Flask) -> FlaskClient:
    client = app.test_client()
    files = {f"photos/{n}.jpg": photo_jpeg(n) for n in ("coffee", "moon", "rocket")}
    submit(client, "/food/train", {"file": upload(make_zip(files)), "fine_tune": "never"})
    return client


# --- 1. bounded work per request --------------------------------------------------------------


# Werkzeug's form parser, stopped at the part limit, leaves its spooled temporary file to the
# garbage collector (it closes it then): a ResourceWarning in the test client, nothing more.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_too_many_images_in_one_query_is_a_413_that_says_so(trained_client: FlaskClient) -> None:
    tiny = png(Image.new("RGB", (4, 4)))
    parts = {"image": [upload(tiny, f"{i}.png") for i in range(40)]}
    assert_error(trained_client.post("/food/infer", data=parts), 413, "40 images in one request", "32")
    many = {"image": [upload(tiny, f"{i}.png") for i in range(1001)]}
    body = assert_error(trained_client.post("/food/infer", data=many), 413, "too many parts")
    assert "MB" not in body["message"]  # a 198 KB body is not "too large"


def test_a_jpeg_scan_bomb_is_refused_before_it_is_decoded(trained_client: FlaskClient) -> None:
    bomb = scan_bomb()
    assert bomb.count(b"\xff\xda") > images.MAX_JPEG_SCANS
    response = trained_client.post("/food/infer", data=bomb, content_type="image/jpeg")
    assert_error(response, 400, "scans, over the limit")


@pytest.mark.parametrize(
    "make, mode",
    [
        (lambda: png(Image.new("I;16", (6000, 6000))), "I;16"),  # 36 Mpx, inside MAX_IMAGE_PIXELS
        (lambda: png(Image.new("P", (5000, 5000)), transparency=0), "RGBA"),
    ],
)
def test_the_pixel_budget_counts_bytes_per_pixel(
    trained_client: FlaskClient, make: Callable[[], bytes], mode: str
) -> None:
    data = make()
    assert len(data) < 200_000  # a small file...
    response = trained_client.post("/food/infer", data=data, content_type="image/png")
    assert_error(response, 400, f"{mode} image needs", "MB to decode")  # ...that would need GBs


def test_training_has_a_time_limit_per_job(make_app: Callable[..., Flask]) -> None:
    client = make_app(job_max_s=0.0).test_client()
    files = {f"photos/{n}.jpg": photo_jpeg(n) for n in ("coffee", "moon")}
    response = client.post("/food/train", data={"file": upload(make_zip(files))})
    from tests.helpers import wait_job

    job = wait_job(client, response.get_json()["status_url"])
    assert job["status"] == "failed" and "time limit" in job["error"]


def test_training_skips_an_image_that_takes_too_long_to_decode(make_app: Callable[..., Flask]) -> None:
    client = make_app(image_decode_max_s=0.0).test_client()
    files = {"photos/big.png": png(Image.new("RGB", (4000, 4000))), "photos/moon.jpg": photo_jpeg("moon")}
    response = client.post("/food/train", data={"file": upload(make_zip(files))})
    from tests.helpers import wait_job

    job = wait_job(client, response.get_json()["status_url"])
    assert any("to decode" in s["reason"] for s in job["skipped"]) or job["status"] == "failed", job


# --- 3. slow clients: loopback unless told ------------------------------------------------------


def test_the_server_binds_to_loopback_unless_told_otherwise() -> None:
    script = "import service.server.gunicorn_conf as c; print(c.bind)"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    local = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert local.stdout.strip() == "127.0.0.1:8000"
    aws = subprocess.run(
        [sys.executable, "-c", script], env={**env, "SERVICE_PROFILE": "aws"}, capture_output=True, text=True
    )
    assert aws.stdout.strip() == "0.0.0.0:8000"
    told = subprocess.run(
        [sys.executable, "-c", script], env={**env, "HOST": "0.0.0.0"}, capture_output=True, text=True
    )
    assert told.stdout.strip() == "0.0.0.0:8000"


# --- 4. metadata that would break answers ---------------------------------------------------------


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"filename": "photos/moon.jpg", "price": NaN}', "not valid JSON"),
        ('{"filename": "photos/moon.jpg", "price": Infinity}', "not valid JSON"),
        ('{"filename": "photos/moon.jpg", "deep": ' + "[" * 975 + "]" * 975 + "}", "deeper than"),
        ('{"filename": "photos/moon.jpg", "big": "' + "x" * 70_000 + '"}', "over the limit"),
    ],
)
def test_metadata_that_json_cannot_carry_fails_the_job_clearly(app: Flask, line: str, problem: str) -> None:
    client = app.test_client()
    files = {"photos/moon.jpg": photo_jpeg("moon"), "metadata.jsonl": (line + "\n").encode()}
    response = client.post("/food/train", data={"file": upload(make_zip(files))})
    from tests.helpers import wait_job

    job = wait_job(client, response.get_json()["status_url"])
    assert job["status"] == "failed" and problem in job["error"], job


def test_answers_are_standard_json_even_with_non_finite_numbers(app: Flask) -> None:
    with app.app_context():
        assert json.loads(app.json.dumps({"x": float("nan"), "y": [float("inf"), 1.5]})) == {
            "x": None,
            "y": [None, 1.5],
        }


# --- 5. the aggregate expansion ratio ---------------------------------------------------------


def test_many_small_entries_that_expand_too_much_together_are_refused(app: Flask) -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(20):  # each under the 1 MB per-entry floor, 20 MB in all
            zf.writestr(f"photos/{i}.bmp", b"\0" * 999_000)
    response = app.test_client().post("/food/train", data={"file": upload(out.getvalue())})
    assert_error(response, 413, "in all", "zip bomb")


# --- 6. headers and URLs ------------------------------------------------------------------------


def test_images_are_never_sniffed_and_protected_ones_never_shared(make_app: Callable[..., Flask]) -> None:
    query = "q" * 20
    client = make_app(query_token=query, admin_token="a" * 20).test_client()
    admin = {"Authorization": "Bearer " + "a" * 20}
    files = {"photos/moon.jpg": photo_jpeg("moon"), "photos/coffee.jpg": photo_jpeg("coffee")}
    response = client.post("/food/train", data={"file": upload(make_zip(files))}, headers=admin)
    from tests.helpers import wait_job

    wait_job(client, response.get_json()["status_url"], headers=admin)
    found = client.post(
        "/food/infer",
        data=photo_jpeg("moon"),
        content_type="image/jpeg",
        headers={"Authorization": f"Bearer {query}"},
    ).get_json()["results"][0]
    with client.get(found["image_url"].removeprefix("http://localhost")) as image:
        assert image.status_code == 200
        assert image.headers["X-Content-Type-Options"] == "nosniff"
        assert "private" in image.headers["Cache-Control"] and "public" not in image.headers["Cache-Control"]


def test_only_trusted_host_names_build_urls(client: FlaskClient) -> None:
    assert client.get("/health", headers={"Host": "evil.example"}).status_code == 400
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host


def test_every_answer_has_a_content_security_policy(client: FlaskClient) -> None:
    docs = client.get("/docs")
    assert "frame-ancestors 'none'" in docs.headers["Content-Security-Policy"]
    assert (
        client.get("/health").headers["Content-Security-Policy"]
        == "default-src 'none'; frame-ancestors 'none'"
    )


# --- 7. no unhandled errors -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/food/rollback", "/food/train", "/worker/jobs"])
def test_deeply_nested_json_is_a_422_not_a_500(client: FlaskClient, path: str) -> None:
    deep = "[" * 50_000 + "]" * 50_000
    response = client.post(path, data=deep, content_type="application/json")
    assert response.status_code in (404, 422), response.get_json()  # /worker/jobs: not a worker here
    assert response.status_code != 500


@pytest.mark.parametrize("count", ["lots", "\u00b2", "-1", "99999999999"])
def test_a_non_numeric_sqs_receive_count_is_a_422(make_app: Callable[..., Flask], count: str) -> None:
    client = make_app(service_role="worker").test_client()
    response = client.post(
        "/worker/jobs",
        json={"job_id": "0" * 16},
        headers={"User-Agent": "aws-sqsd/3.0", "X-Aws-Sqsd-Receive-Count": count},
        environ_base={"REMOTE_ADDR": "127.0.0.1"},
    )
    assert_error(response, 422, "Receive-Count")


DISK_FULL = textwrap.dedent("""
    import io, resource, signal, sys
    from service import create_app
    app = create_app({"storage_uri": sys.argv[1], "cache_dir": sys.argv[2], "models_dir": sys.argv[3],
                      "warm_on_start": False})
    client = app.test_client()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # the disk is "full" past 100 KB
    response = client.post("/food/train", data={"file": (io.BytesIO(b"PK" + b"0" * 300_000), "z.zip")})
    print(response.status_code, response.get_json()["message"])
""")


def test_a_full_disk_while_saving_an_upload_is_a_507(tmp_path: Path, models_dir: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(tmp_path / "store"), str(tmp_path / "cache"), str(models_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.stdout.startswith("507 this instance's disk is full"), run.stdout + run.stderr[-2000:]


# --- 8. answers that match the docs -----------------------------------------------------------


def test_a_chunked_body_over_the_limit_is_a_413(trained_client: FlaskClient) -> None:
    body = photo_jpeg("moon") + b"\0" * (21 * 1024 * 1024)  # over the 20 MB image limit
    response = trained_client.post(
        "/food/infer",
        input_stream=io.BytesIO(body),
        headers={"Transfer-Encoding": "chunked", "Content-Type": "image/jpeg"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert_error(response, 413, "limit 20 MB")


# --- 9. information leaks ------------------------------------------------------------------------


def test_answers_carry_no_server_paths_or_process_ids(app: Flask) -> None:
    client = app.test_client()
    job = submit(client, "/food/train", {"file": upload(make_zip({"photos/moon.jpg": photo_jpeg("moon")}))})
    assert "runner" not in job
    serving = client.get("/food").get_json()["encoder"]["serving"]
    assert "location" not in serving and str(ROOT) not in json.dumps(client.get("/food").get_json())


def test_without_the_query_token_health_and_unknown_endpoints_say_nothing(
    make_app: Callable[..., Flask],
) -> None:
    client = make_app(query_token="q" * 20, admin_token="a" * 20).test_client()
    assert client.get("/health").get_json() == {"status": "ok"}
    assert "endpoints" in client.get("/health", headers={"Authorization": "Bearer " + "q" * 20}).get_json()
    assert client.get("/food").status_code == 401
    assert client.get("/no-such-endpoint").status_code == 401  # the same as a known one


# --- 3. slow clients against the Procfile's gunicorn ---------------------------------------------


@pytest.mark.slow
def test_slow_clients_do_not_stop_the_server(tmp_path: Path, models_dir: Path) -> None:
    import socket
    import threading
    import time

    import requests

    from tests.helpers import procfile_server

    env = {
        "WEB_CONCURRENCY": "2",
        "MODELS_DIR": str(models_dir),
        "GUNICORN_HEADER_TIMEOUT": "2",
        "GUNICORN_BODY_TIMEOUT": "2",
        "WARM_ON_START": "0",
    }
    with procfile_server(tmp_path, env) as server:
        host, port = server.url.removeprefix("http://").split(":")
        stop = threading.Event()

        def slowloris() -> None:  # headers, one byte every 0.5 s, for as long as the test runs
            while not stop.is_set():
                try:
                    with socket.create_connection((host, int(port)), timeout=5) as s:
                        for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-a: " + b"a" * 1000:
                            if stop.is_set():
                                return
                            s.send(bytes([byte]))
                            time.sleep(0.5)
                except OSError:
                    continue  # dropped by the server: come back, as an attacker would

        attackers = [threading.Thread(target=slowloris, daemon=True) for _ in range(40)]
        for thread in attackers:
            thread.start()
        try:
            time.sleep(3)  # every thread of both workers would be taken by now, without the fix
            answered = [requests.get(f"{server.url}/health", timeout=12).status_code for _ in range(5)]
            assert answered == [200] * 5
            # A body that trickles in is cut off with a 408 (or the connection is dropped).
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(
                    b"POST /food/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                    b"Content-Length: 100000\r\n\r\n"
                )
                started = time.monotonic()
                try:
                    for _ in range(20):
                        s.send(b"x")
                        time.sleep(0.3)
                    reply = s.recv(4096)
                except OSError:
                    reply = b""
                assert time.monotonic() - started < 15
                assert reply == b"" or b" 408 " in reply.split(b"\r\n")[0], reply[:200]
        finally:
            stop.set()


def test_decodes_are_bounded_per_process_and_forward_passes_are_chunked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading
    import time
    from types import SimpleNamespace

    import numpy as np

    from service.core.endpoint import QueryConfig
    from service.serving import query

    running, peak, lock = [0], [0], threading.Lock()
    real_prepare = images.prepare

    def slow_prepare(*args: object, **kwargs: object) -> object:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        try:
            return real_prepare(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(images, "prepare", slow_prepare)
    passes: list[int] = []
    encoder = SimpleNamespace(
        input_size=32, encode=lambda batch: passes.append(len(batch)) or np.zeros((len(batch), 4))
    )
    loaded = SimpleNamespace(encoder=encoder, query=QueryConfig())  # the plain query: one pass
    tiny = png(Image.new("RGB", (8, 8)))
    threads = [
        threading.Thread(target=query.embed_uploads, args=(loaded, [("x.png", tiny)] * 20, 10_000))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] <= query.DECODE_SLOTS
    assert max(passes) <= query.FORWARD_CHUNK and sum(passes) == 160
