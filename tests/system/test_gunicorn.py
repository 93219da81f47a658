"""End to end through the Procfile's gunicorn command: train, infer, and a live version swap."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from bench import demo
from tests.helpers import TEST_PHOTOS, Server, make_zip, procfile_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Server]:
    env = {"WEB_CONCURRENCY": "2", "MODELS_DIR": str(models_dir), "WATCH_INTERVAL_S": "0.5"}
    with procfile_server(tmp_path_factory.mktemp("gunicorn"), env) as running:
        yield running


def train(server: Server, endpoint: str, zip_bytes: bytes) -> dict:
    response = requests.post(
        f"{server.url}/{endpoint}/train",
        files={"file": ("photos.zip", zip_bytes, "application/zip")},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    status_url = response.json()["status_url"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        job = requests.get(status_url, timeout=10).json()  # may be answered by either worker
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job did not finish: {job}")


def infer(server: Server, endpoint: str, image: bytes, k: int = 3) -> requests.Response:
    return requests.post(
        f"{server.url}/{endpoint}/infer",
        params={"k": k},
        files={"image": ("query.jpg", image, "image/jpeg")},
        timeout=30,
    )


def test_train_then_infer_real_photos(server: Server, photos_zip: Path) -> None:
    workers = server.workers()
    assert len(workers) == 2
    job = train(server, "food", photos_zip.read_bytes())
    assert job["status"] == "succeeded", job
    assert job["counts"]["images"] == 5 * len(TEST_PHOTOS)
    assert len(job["counts"]["labels"]) == len(TEST_PHOTOS)
    seen = server.versions_by_worker("food", job["version"])
    assert seen == dict.fromkeys(workers, job["version"]), "every worker serves the new version"

    # One of the indexed photos finds itself first.
    own = infer(server, "food", demo.jpeg(demo.photo("coffee"))).json()
    assert own["results"][0]["name"] == "coffee/coffee-original.jpg"
    assert own["results"][0]["score"] >= 0.99

    # The same photo, resized and re-encoded as a low-quality JPEG, still finds its original.
    small = demo.photo("rocket").resize((213, 142))
    changed = infer(server, "food", demo.jpeg(small, quality=50)).json()
    assert "rocket/rocket-original.jpg" in [r["name"] for r in changed["results"]]

    # An upload that is not an image is a 400 with a JSON body, not a 500.
    bad = infer(server, "food", b"definitely not a jpeg")
    assert bad.status_code == 400 and bad.json()["code"] == 400

    # The image URL in a result serves the original bytes.
    image = requests.get(own["results"][0]["image_url"], timeout=10)
    assert image.status_code == 200 and image.headers["Content-Type"] == "image/jpeg"


def test_concurrent_requests_each_get_their_own_answer(server: Server) -> None:
    photos = {name: demo.jpeg(demo.photo(name)) for name in TEST_PHOTOS}
    asks = [name for name in TEST_PHOTOS for _ in range(6)]  # 36 requests, 12 at a time

    def ask(name: str) -> tuple[str, int, str]:
        response = infer(server, "food", photos[name], k=1)
        return name, response.status_code, response.json()["results"][0]["name"]

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, asks))
    assert [status for _, status, _ in answers] == [200] * len(asks)
    assert all(found == f"{name}/{name}-original.jpg" for name, _, found in answers)


def test_keep_alive_clients_spread_evenly_over_the_workers(server: Server) -> None:
    # Plain gthread workers share one listening socket and the kernel lets one of them win most
    # accepts: 8 keep-alive clients often all land on one worker (server/worker.py).
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    while seen != server.workers() and time.monotonic() < deadline:  # both workers serve first
        seen |= {requests.get(f"{server.url}/health", timeout=10).json()["worker"] for _ in range(4)}
    host, port = server.url.removeprefix("http://").split(":")
    clients = [http.client.HTTPConnection(host, int(port), timeout=10) for _ in range(8)]
    try:
        for _ in range(10):  # rounds: a connection handed back reconnects to the other worker
            owners = []
            for client in clients:
                client.request("GET", "/health")
                response = client.getresponse()
                owners.append(json.loads(response.read())["worker"])
            if sorted(Counter(owners).values()) == [4, 4]:
                break
            time.sleep(0.1)
        assert sorted(Counter(owners).values()) == [4, 4]
    finally:
        for client in clients:
            client.close()


def test_a_kept_alive_connection_serves_requests_however_they_follow(server: Server) -> None:
    # After a response the thread waits a moment for the connection's next request (server/worker.py,
    # GUNICORN_KEEPALIVE_LINGER_MS): one sent at once, one after the wait (via the poller), two
    # pipelined in one packet, and a body read ahead with the previous request all get their answer.
    host, port = server.url.removeprefix("http://").split(":")
    get = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    head = f"POST /food/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\nContent-Length: 3"
    post = f"{head}\r\n\r\nabc".encode()  # not an image
    with socket.create_connection((host, int(port)), timeout=10) as sock, sock.makefile("rb") as reader:

        def answers(n: int) -> list[int]:
            statuses = []
            for _ in range(n):
                status = int(reader.readline().split()[1])
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                reader.read(length)
                statuses.append(status)
            return statuses

        sock.sendall(get)
        assert answers(1) == [200]
        sock.sendall(get)  # at once: the thread that answered is still waiting
        assert answers(1) == [200]
        time.sleep(0.2)  # long after the wait: the connection went back to the poller
        sock.sendall(get)
        assert answers(1) == [200]
        sock.sendall(get + get)  # pipelined
        assert answers(2) == [200, 200]
        sock.sendall(post + get)  # the next request arrives with the previous body
        refused, health = answers(2)
        assert refused in (400, 503) and health == 200  # 503 before food has a version


def test_a_new_version_reaches_every_worker_without_a_restart(server: Server, photos_zip: Path) -> None:
    workers = server.workers()
    first = train(server, "food", photos_zip.read_bytes())
    assert server.versions_by_worker("food", first["version"]) == dict.fromkeys(workers, first["version"])

    # Keep querying while the second version is trained, published and swapped in.
    statuses: list[int] = []
    versions: set[str] = set()
    stop = threading.Event()
    query = demo.jpeg(demo.photo("moon"))

    def hammer() -> None:
        while not stop.is_set():
            response = infer(server, "food", query)
            statuses.append(response.status_code)
            if response.ok:
                versions.add(response.json()["version"])

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        second_zip = make_zip({f"{n}/{n}.jpg": demo.jpeg(demo.photo(n)) for n in ("moon", "coins")})
        second = train(server, "food", second_zip)
        assert second["status"] == "succeeded", second
        seen = server.versions_by_worker("food", second["version"])
        time.sleep(1)  # a little traffic after the swap
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert seen == dict.fromkeys(workers, second["version"])
    assert server.workers() == workers, "no worker was restarted"
    assert statuses and set(statuses) == {200}, f"failed requests during the swap: {statuses}"
    assert second["version"] in versions and versions <= {first["version"], second["version"]}
    body = infer(server, "food", query, k=5).json()
    assert body["version"] == second["version"] and len(body["results"]) == 2


def test_errors_through_gunicorn_are_json(server: Server) -> None:
    response = requests.post(
        f"{server.url}/food/infer", data=b"plain", timeout=10, headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 415 and response.json()["code"] == 415
    response = infer(server, "shoes", b"x")
    assert response.status_code == 404 and "shoes" in response.json()["message"]
    response = infer(server, "fashion", demo.jpeg(demo.photo("moon")))  # never trained here
    assert response.status_code == 503 and "no trained version" in response.json()["message"]
