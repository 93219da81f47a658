"""Hardening, third pass: the item routes, filters, rollback and the answers' small print; each
defect an attacker found, as a request that must now get a clear answer and change nothing."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.serving import filters, query
from service.storage import versions
from service.training.changes import merge_patch
from tests.helpers import assert_error, make_zip, photo_jpeg, submit, upload, wait_job

PHOTOS = ("coffee", "moon", "rocket", "astronaut")


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(keep_versions=20)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    client = app.test_client()
    files = {f"photos/{n}.jpg": photo_jpeg(n) for n in PHOTOS}
    submit(client, "/food/train", {"file": upload(make_zip(files)), "fine_tune": "never"})
    return client


def current(client: FlaskClient) -> str:
    return client.get("/food").get_json()["version"]


def id_of(client: FlaskClient, name: str) -> int:
    body = client.post("/food/infer?k=1", data=photo_jpeg(name), content_type="image/jpeg").get_json()
    return int(body["results"][0]["id"])


# --- 2. a chunked body over a small route's limit ------------------------------------------------


def test_a_chunked_json_body_over_the_limit_is_a_413_not_a_misread(client: FlaskClient) -> None:
    body = json.dumps({"version": "x" * (2 * 1024 * 1024)}).encode()  # the limit is 1 MB
    response = client.post(
        "/food/rollback",
        input_stream=io.BytesIO(body),
        headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert_error(response, 413)


# --- 5. photos per item, and the work of `similar` -----------------------------------------------


def grouped_zip(photos: int, item: str = "lamp") -> bytes:
    names = [f"photos/{item}-{i}.jpg" for i in range(photos)]
    rows = "\n".join(json.dumps({"filename": n, "item": item}) for n in names)
    return make_zip({**{n: photo_jpeg(PHOTOS[i % 4], (64 + i, 64)) for i, n in enumerate(names)},
                     "metadata.jsonl": rows.encode()})  # fmt: skip


def test_an_item_with_more_photos_than_allowed_fails_its_job_naming_it(
    make_app: Callable[..., Flask],
) -> None:
    client = make_app(max_photos_per_item=3).test_client()
    answer = client.post("/food/train", data={"file": upload(grouped_zip(4))})
    job = wait_job(client, answer.get_json()["status_url"])
    assert job["status"] == "failed" and "'lamp' has 4 photos" in job["error"]
    assert "MAX_PHOTOS_PER_ITEM" in job["error"]


def test_similar_searches_with_a_bounded_number_of_an_items_photos(
    make_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_app().test_client()
    submit(client, "/food/train", {"file": upload(grouped_zip(20)), "fine_tune": "never"})
    item = id_of(client, "coffee")
    searches = []
    real = query.search
    monkeypatch.setattr(query, "search", lambda *a, **kw: searches.append(1) or real(*a, **kw))
    assert client.get(f"/food/items/{item}/similar?k=3").status_code == 200
    assert len(searches) == query.SIMILAR_PHOTOS < 20


def test_an_item_named_after_an_image_of_another_item_is_refused(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    rows = json.dumps({"filename": "photos/b.jpg", "item": "photos/a.jpg"}).encode()
    zip_bytes = make_zip({"photos/a.jpg": photo_jpeg("moon"), "photos/b.jpg": photo_jpeg("coffee"),
                          "metadata.jsonl": rows})  # fmt: skip
    job = wait_job(
        client, client.post("/food/train", data={"file": upload(zip_bytes)}).get_json()["status_url"]
    )
    assert job["status"] == "failed" and "is the name of an image of another item" in job["error"]


def test_labels_count_items_not_photos(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    submit(client, "/food/train", {"file": upload(grouped_zip(3)), "fine_tune": "never"})
    assert client.get("/food").get_json()["labels"] == {"photos": 1}


# --- 6. numbers beyond a double -------------------------------------------------------------------

HUGE = int("9" * 400)


def test_a_huge_integer_is_a_422_in_filters_and_in_metadata(client: FlaskClient) -> None:
    where = json.dumps({"price": {"min": HUGE}})
    before = current(client)
    answer = client.post(f"/food/infer?where={where}", data=photo_jpeg("moon"), content_type="image/jpeg")
    assert_error(answer, 422, "beyond the range of a double")
    item = id_of(client, "moon")
    assert_error(client.get(f"/food/items/{item}/similar?where={where}"), 422, "beyond the range")
    patch = client.patch(f"/food/items/{item}", data=f'{{"metadata": {{"price": {HUGE}}}}}',
                         content_type="application/json")  # fmt: skip
    assert_error(patch, 422, "beyond the range of a double")
    assert current(client) == before


def test_a_huge_integer_already_stored_never_breaks_a_range_filter() -> None:
    flt = filters.parse_filter(None, {"price": {"min": 1}})
    assert flt is not None
    rows = [{"label": "a", "metadata": {"price": HUGE}}, {"label": "a", "metadata": {"price": 5}}]
    assert filters.evaluate(flt, rows, filters.ColumnCache()).tolist() == [False, True]
    assert not filters.matches(flt, rows[0])


# --- 7, 8. damaged files: no rollback to them, no change carrying them ------------------------------


def damage_encoder(app: Flask, version: str) -> None:
    service = app.extensions["simsvc"]
    manifest = versions.read_manifest(service.storage, "food", version)
    assert manifest.encoder_model is not None
    path = service.storage.local_path(manifest.encoder_model.key_in("food"))
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")


def test_a_rollback_to_a_damaged_version_is_a_409_naming_the_file(app: Flask, client: FlaskClient) -> None:
    first = current(client)
    client.patch(f"/food/items/{id_of(client, 'moon')}", json={"label": "space"})
    second = current(client)
    damage_encoder(app, first)  # both versions share the blob: the current one too
    answer = client.post("/food/rollback", json={"version": first})
    assert_error(answer, 409, "does not match its sha256")
    assert versions.read_current(app.extensions["simsvc"].storage, "food").version == second


def test_a_change_on_a_damaged_version_publishes_nothing(app: Flask, client: FlaskClient) -> None:
    before = current(client)
    damage_encoder(app, before)
    item = id_of(client, "moon")
    assert_error(client.patch(f"/food/items/{item}", json={"label": "space"}), 409, "is damaged")
    assert versions.read_current(app.extensions["simsvc"].storage, "food").version == before


# --- 9. ids are integers --------------------------------------------------------------------------


def test_a_batch_delete_with_a_float_id_is_a_422_and_deletes_nothing(client: FlaskClient) -> None:
    before = current(client)
    item = id_of(client, "moon")
    for ids in ([item + 0.9], [float(item)], [True], [str(item)]):
        assert_error(client.delete("/food/items", json={"ids": ids}), 422, "Not a valid integer")
    assert current(client) == before


# --- 10. PATCH is a JSON merge patch (RFC 7396) ----------------------------------------------------

RFC_7396_EXAMPLES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "result"), RFC_7396_EXAMPLES)
def test_merge_patch_follows_rfc_7396_appendix_a(target: Any, patch: Any, result: Any) -> None:
    assert merge_patch(target, patch) == result


def test_patch_merges_nested_fields_removes_nulls_and_publishes_nothing_when_nothing_changes(
    client: FlaskClient,
) -> None:
    item = id_of(client, "moon")

    def metadata() -> dict[str, Any]:
        body = client.post("/food/infer?k=1", data=photo_jpeg("moon"), content_type="image/jpeg").get_json()
        return body["results"][0]["metadata"]

    assert (
        client.patch(f"/food/items/{item}", json={"metadata": {"dims": {"w": 1, "h": 2}}}).status_code == 200
    )
    client.patch(f"/food/items/{item}", json={"metadata": {"dims": {"w": 2}}})
    assert metadata() == {"dims": {"w": 2, "h": 2}}  # h kept
    client.patch(f"/food/items/{item}", json={"metadata": {"dims": {"h": None}, "x": None}})
    assert metadata() == {"dims": {"w": 2}}  # removed, not stored as null
    client.patch(f"/food/items/{item}", json={"metadata": None})
    assert metadata() == {}
    before = current(client)
    for same in ({"metadata": None}, {"metadata": {}}, {"metadata": {"gone": None}}, {"label": "photos"}):
        answer = client.patch(f"/food/items/{item}", json=same)
        assert answer.status_code == 200 and answer.get_json()["version"] == before
    assert current(client) == before and len(client.get("/food/versions").get_json()["versions"]) == 5


# --- 11. one rule for labels and names ----------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "field"),
    [
        ({"label": "a/b"}, "label"),
        ({"label": "ok\0evil"}, "label"),
        ({"label": "shoes\u202e"}, "label"),  # a right-to-left override
        ({"label": "sh\u200boes"}, "label"),  # a zero-width space
        ({"label": " "}, "label"),
        ({"label": "."}, "label"),
        ({"label": ".hidden"}, "label"),
        ({"label": "x" * 201}, "label"),
        ({"name": "nul/x.png\0.exe"}, "name"),
        ({"name": "../x.png"}, "name"),
    ],
)
def test_a_label_or_name_outside_the_rule_is_a_422_naming_the_field(
    client: FlaskClient, form: dict[str, str], field: str
) -> None:
    before = current(client)
    answer = client.post("/food/items", data={"image": (io.BytesIO(photo_jpeg("moon")), "m.jpg"), **form})
    assert assert_error(answer, 422)["errors"] == {field: answer.get_json()["errors"][field]}
    assert current(client) == before


@pytest.mark.parametrize("label", ["", "x" * 256, "a/b", ".", "tab\there"])
def test_patch_refuses_a_label_filters_could_not_use(client: FlaskClient, label: str) -> None:
    before = current(client)
    answer = client.patch(f"/food/items/{id_of(client, 'moon')}", json={"label": label})
    assert "label" in assert_error(answer, 422)["errors"]
    assert current(client) == before


# --- the small print ---------------------------------------------------------------------------------


def test_metrics_name_their_charset_once(client: FlaskClient) -> None:
    assert client.get("/metrics").headers["Content-Type"].count("charset") == 1


def test_a_404_for_a_long_unknown_name_does_not_echo_it_whole(client: FlaskClient) -> None:
    body = assert_error(client.get("/" + "x" * 200_000), 404)
    assert len(json.dumps(body)) < 1000


def _probe_health(url: str, count: int, timeout: float) -> list[tuple[int | None, float]]:
    """`count` GET /health one after another: each one's status (None: no answer) and seconds."""
    import time

    import requests

    probes: list[tuple[int | None, float]] = []
    for _ in range(count):
        started = time.monotonic()
        try:
            code: int | None = requests.get(f"{url}/health", timeout=timeout).status_code
        except requests.RequestException:
            code = None
        probes.append((code, round(time.monotonic() - started, 2)))
    return probes


def _health_beside(url: str, held: list[Any], settle_s: float, timeout: float, under_s: float) -> None:
    """With the sockets `held` open for `settle_s` seconds, one GET /health answers 200 within
    `under_s` seconds; the sockets are closed whatever happens."""
    import time

    try:
        time.sleep(settle_s)
        ((code, seconds),) = _probe_health(url, 1, timeout=timeout)
        assert code == 200 and seconds < under_s
    finally:
        for sock in held:
            sock.close()


# --- 1. slow request bodies on bare gunicorn ------------------------------------------------------


@pytest.mark.slow
def test_health_and_queries_answer_while_40_clients_trickle_bodies(tmp_path: Path, models_dir: Path) -> None:
    import socket
    import threading
    import time

    import requests

    from tests.helpers import procfile_server

    env = {"WEB_CONCURRENCY": "2", "MODELS_DIR": str(models_dir), "WARM_ON_START": "0"}
    with procfile_server(tmp_path, env) as server:
        host, port = server.url.removeprefix("http://").split(":")
        stop = threading.Event()

        def client(head: bytes, piece: bytes) -> None:
            while not stop.is_set():
                try:
                    with socket.create_connection((host, int(port)), timeout=5) as s:
                        s.sendall(head)
                        while not stop.is_set():
                            s.sendall(piece)
                            time.sleep(0.25)
                except OSError:
                    continue  # cut off by the server: come back, as an attacker would

        trickle = (  # a 20 MB body declared, a byte at a time
            b"POST /food/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 20000000\r\n\r\n",
            b"x",
        )
        attackers = [threading.Thread(target=client, args=trickle, daemon=True) for _ in range(40)]
        for thread in attackers:
            thread.start()
        try:
            time.sleep(4)  # every thread of both workers is taken by now, without the fix
            probes = _probe_health(server.url, 8, timeout=10)
            assert sum(code == 200 and seconds < 3 for code, seconds in probes) >= 7, probes
            query = requests.post(f"{server.url}/food/infer", data=photo_jpeg("moon"), timeout=10,
                                  headers={"Content-Type": "image/jpeg"})  # fmt: skip
            assert query.status_code in (200, 503), query.text  # 503: food is not trained here
        finally:
            stop.set()


@pytest.mark.slow
def test_clients_that_never_close_do_not_hold_the_workers_loop(tmp_path: Path, models_dir: Path) -> None:
    """gunicorn 27 closes a connection by reading until the client closes too, for up to 2 s, on
    the worker's main loop: six clients that ask for "Connection: close" and then send a byte now
    and then kept one worker from accepting anyone (server/worker.py never waits there)."""
    import socket
    import threading
    import time

    from tests.helpers import procfile_server

    env = {"WEB_CONCURRENCY": "1", "MODELS_DIR": str(models_dir), "WARM_ON_START": "0"}
    with procfile_server(tmp_path, env) as server:
        host, port = server.url.removeprefix("http://").split(":")
        stop = threading.Event()

        def lingering() -> None:
            while not stop.is_set():
                try:
                    with socket.create_connection((host, int(port)), timeout=5) as s:
                        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                        while not stop.is_set():  # never reads the answer, never closes
                            s.sendall(b"x")
                            time.sleep(0.25)
                except OSError:
                    continue

        for _ in range(6):
            threading.Thread(target=lingering, daemon=True).start()
        try:
            time.sleep(2)
            probes = _probe_health(server.url, 6, timeout=5)
            assert sum(code == 200 and seconds < 1 for code, seconds in probes) >= 5, probes
        finally:
            stop.set()


@pytest.mark.slow
def test_clients_that_never_read_their_responses_do_not_hold_the_threads(
    tmp_path: Path, models_dir: Path
) -> None:
    """20 connections (more than a worker's 16 threads) each ask for a 1.5 MB file eight times
    over, with a tiny receive buffer, and never read: every thread waited on a full socket for
    ever. A response that makes no progress for GUNICORN_WRITE_STALL_TIMEOUT is cut."""
    import socket

    import requests

    from tests.helpers import procfile_server

    env = {
        "WEB_CONCURRENCY": "1",
        "MODELS_DIR": str(models_dir),
        "WARM_ON_START": "0",
        "GUNICORN_WRITE_STALL_TIMEOUT": "1",
    }
    with procfile_server(tmp_path, env) as server:
        host, port = server.url.removeprefix("http://").split(":")
        ask = b"GET /docs/assets/swagger-ui-bundle.js.map HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 8
        assert (
            len(requests.get(f"{server.url}/docs/assets/swagger-ui-bundle.js.map", timeout=10).content)
            > 10**6
        )
        readers = []
        for _ in range(20):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect((host, int(port)))
            s.sendall(ask)
            readers.append(s)
        _health_beside(server.url, readers, settle_s=1, timeout=20, under_s=10)


@pytest.mark.slow
def test_idle_connections_wait_in_the_poller_not_in_threads(tmp_path: Path, models_dir: Path) -> None:
    """gunicorn waits up to 5 s for a new connection's first byte in a pool thread: 20 connections
    that send nothing held one worker's 16 threads, and /health waited seconds behind them."""
    import socket

    from tests.helpers import procfile_server

    env = {"WEB_CONCURRENCY": "1", "MODELS_DIR": str(models_dir), "WARM_ON_START": "0"}
    with procfile_server(tmp_path, env) as server:
        host, port = server.url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(20)]
        _health_beside(server.url, idle, settle_s=0.5, timeout=10, under_s=1.5)


# --- smaller: TensorFlow stays out of web workers ---------------------------------------------------


def test_an_add_in_a_web_workers_thread_never_loads_tensorflow(make_app: Callable[..., Flask]) -> None:
    from service.training import changes

    app = make_app(encoder_runtime="tensorflow")  # versions served by TensorFlow: an add needs it
    client, service = app.test_client(), app.extensions["simsvc"]
    trained = submit(client, "/food/train", {"file": upload(make_zip({"p/moon.jpg": photo_jpeg("moon")}))})
    zip_path = service.settings.cache_dir / "add.zip"
    zip_path.write_bytes(make_zip({"p/coffee.jpg": photo_jpeg("coffee")}))
    spec = service.specs["food"]
    with pytest.raises(changes.NeedsTensorFlow):
        changes.add_items(spec, zip_path, service.storage, service.settings, tensorflow=False)
    assert current(client) == trained["version"]


def test_patch_from_1_to_true_is_a_change(client: FlaskClient) -> None:
    item = id_of(client, "moon")
    client.patch(f"/food/items/{item}", json={"metadata": {"in_stock": 1}})
    before = current(client)
    answer = client.patch(f"/food/items/{item}", json={"metadata": {"in_stock": True}})
    assert answer.get_json()["version"] != before
    where = json.dumps({"in_stock": True})
    found = client.post(f"/food/infer?k=1&where={where}", data=photo_jpeg("moon"), content_type="image/jpeg")
    assert [r["id"] for r in found.get_json()["results"]] == [item]


def test_filter_columns_outlive_a_change_to_another_item(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = []
    real = filters._build
    monkeypatch.setattr(filters, "_build", lambda *a: builds.append(1) or real(*a))
    where = json.dumps({"colour": "red"})

    def ask() -> None:
        answer = client.post(f"/food/infer?where={where}", data=photo_jpeg("moon"), content_type="image/jpeg")
        assert answer.status_code == 200

    ask()
    assert len(builds) == 1
    client.patch(f"/food/items/{id_of(client, 'coffee')}", json={"label": "drinks"})
    ask()
    assert len(builds) == 1  # the segment's columns came along to the new version
