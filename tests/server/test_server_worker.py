"""Balancing keep-alive connections over gunicorn workers: the shared table and the hand-back rule."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from service.server import worker as balanced
from service.server.worker import FREE, BalancedThreadWorker, ConnectionTable


def test_slots_are_claimed_and_released() -> None:
    table = ConnectionTable(slots=3)
    assert table.claim(taken=set()) == 0
    assert table.claim(taken={0}) == 1
    assert table.claim(taken={0, 1, 2}) is None  # more workers than slots: that one runs unbalanced
    table.release(1)
    assert table.counts[1] == FREE


def test_a_worker_accepts_only_while_it_holds_no_more_than_any_peer() -> None:
    table = ConnectionTable(slots=4)
    for slot in (0, 1, 2):
        table.claim(taken=set(range(slot)))
    table.publish(0, 3)
    table.publish(1, 2)
    table.publish(2, 5)
    assert not table.may_accept(0, 3)  # slot 1 holds fewer
    assert table.may_accept(1, 2)
    table.release(1)  # a dead worker's slot is ignored, not read as "holds none"
    assert table.may_accept(0, 3)
    assert table.may_accept(3, 0)  # a worker with no connection always may


def test_booting_and_hung_workers_do_not_hold_the_others_back() -> None:
    table = ConnectionTable(slots=3)
    table.publish(0, 4)
    booting = table.claim(taken={0})  # forked, still loading: nothing published yet
    assert booting == 1 and table.may_accept(0, 4)
    table.publish(booting, 0)  # serving now: new clients go to it
    assert not table.may_accept(0, 4)
    table.seen[booting] -= 10  # its main loop stopped turning: a hung worker
    assert table.may_accept(0, 4)


def _worker(table: ConnectionTable, slot: int, conns: int) -> BalancedThreadWorker:
    worker = BalancedThreadWorker.__new__(BalancedThreadWorker)  # no gunicorn arbiter needed
    worker.balance_slot = slot
    worker.nr_conns = conns
    worker.max_keepalived = 990  # what gthread computes: worker_connections - threads
    table.publish(slot, conns)
    return worker


def test_a_worker_two_connections_ahead_hands_one_back_now_and_then(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = ConnectionTable(slots=2)
    monkeypatch.setattr(balanced, "table", table)
    busy, idle = _worker(table, 0, 6), _worker(table, 1, 2)
    assert busy.max_keepalived == 0  # gthread then answers "Connection: close"
    assert busy.max_keepalived == 990  # not again until the counts can catch up
    assert idle.max_keepalived == 990
    busy._last_shed -= 1
    busy.nr_conns = 3  # one ahead: nothing to gain by moving a client
    assert busy.max_keepalived == 990


def test_a_stopping_worker_leaves_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    table = ConnectionTable(slots=2)
    monkeypatch.setattr(balanced, "table", table)
    stopping, peer = _worker(table, 0, 1), _worker(table, 1, 3)
    stopping.alive, peer.alive = False, True
    assert not stopping._fair()  # it takes no one...
    assert table.counts[0] == FREE and peer._fair()  # ...and no longer holds the busier peer back


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected (server side, client side) pair over loopback TCP, the server side blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    server.setblocking(True)
    return server, client


def _in_thread(fn: Callable[[], object], wait: float) -> list[BaseException]:
    """Run `fn` in a thread for at most `wait` seconds; what it raised (fails if it still runs)."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(wait)
    assert not thread.is_alive(), "the write waited for a client that does not read"
    return failures


@pytest.mark.parametrize("how", ["sendall", "sendfile"])
def test_a_response_the_client_never_reads_is_cut_after_the_stall_timeout(
    how: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(balanced, "WRITE_STALL_S", 0.3)
    server, client = _tcp_pair()
    big = tmp_path / "big"
    big.write_bytes(b"y" * 30_000_000)  # far more than the buffers hold, never read
    with server, client, big.open("rb") as file:
        wrapped = balanced._ReadDeadline(server)
        wrapped.sendall(b"x" * 1000)  # room in the buffers: sent at once
        assert client.recv(2000) == b"x" * 1000
        write = {
            "sendall": lambda: wrapped.sendall(big.read_bytes()),
            "sendfile": lambda: wrapped.sendfile(file, 0, None),
            # gunicorn's "100 Continue" is a plain send(): after the buffers are full it must not wait
            "send": lambda: (
                _in_thread(lambda: wrapped.sendall(big.read_bytes()), 5),
                wrapped.send(b"x" * 25),
            ),
        }[how]
        started = time.monotonic()
        failures = _in_thread(write, 10)
        assert failures and isinstance(failures[-1], BrokenPipeError), failures
        assert "took none of its response" in str(failures[-1]) and wrapped.cut
        assert time.monotonic() - started >= 0.3


@pytest.mark.parametrize("how", ["sendall", "sendfile"])
def test_a_client_that_reads_slowly_gets_all_of_its_response(
    how: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Over TCP the kernel reports room only once a third of the send buffer is free: a client
    reading 300 KB/s takes seconds to make it, yet it reads, so it is never cut."""
    monkeypatch.setattr(balanced, "WRITE_STALL_S", 0.5)
    server, client = _tcp_pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    size = 1_000_000
    source = tmp_path / "file"
    source.write_bytes(b"z" * size)
    got = bytearray()

    def read() -> None:
        while len(got) < size:
            chunk = client.recv(15_000)
            if not chunk:
                return
            got.extend(chunk)
            time.sleep(0.05)  # ~300 KB/s

    with server, client, source.open("rb") as file:
        reader = threading.Thread(target=read)
        reader.start()
        wrapped = balanced._ReadDeadline(server)
        if how == "sendall":
            wrapped.sendall(source.read_bytes())
        else:
            assert wrapped.sendfile(file, 0, size) == size
        reader.join(30)
    assert len(got) == size


def test_a_plain_send_goes_through_the_same_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """gunicorn answers "Expect: 100-continue" with sock.send(): unguarded, a full buffer held the
    thread for ever."""
    calls: list[bytes] = []
    monkeypatch.setattr(balanced._ReadDeadline, "sendall", lambda self, data: calls.append(bytes(data)))
    server, client = _tcp_pair()
    with server, client:
        assert balanced._ReadDeadline(server).send(b"HTTP/1.1 100 Continue\r\n\r\n") == 25
    assert calls == [b"HTTP/1.1 100 Continue\r\n\r\n"]


class _Conn:
    """What the keep-alive linger looks at: the socket and the parser's read-ahead buffer."""

    initialized = data_ready = True  # a kept-alive connection, past its first request

    def __init__(self, sock: Any, read_ahead: bytes = b"") -> None:
        self.sock = sock
        self.parser = SimpleNamespace(unreader=SimpleNamespace(buf=io.BytesIO(read_ahead)))


def _lingering_worker(pool: ThreadPoolExecutor) -> BalancedThreadWorker:
    worker = BalancedThreadWorker.__new__(BalancedThreadWorker)
    worker.alive, worker.tpool = True, pool
    return worker


def test_the_thread_that_answered_serves_the_next_request_when_it_comes_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(balanced, "KEEPALIVE_LINGER_S", 5.0)
    server, client = _tcp_pair()
    with server, client, ThreadPoolExecutor(1) as pool:
        worker = _lingering_worker(pool)
        timer = threading.Timer(0.05, lambda: client.sendall(b"GET /health HTTP/1.1\r\n\r\n"))
        timer.start()
        started = time.monotonic()
        assert worker._next_request_here(_Conn(server))  # arrived while the thread waited
        assert time.monotonic() - started < 4.0  # when it came, not after the whole linger
        timer.join()
        # Bytes read ahead with the last body count as the next request, without waiting.
        assert worker._next_request_here(_Conn(server, b"GET / HTTP/1.1\r\n"))


def test_an_idle_connection_goes_back_to_the_poller_after_the_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(balanced, "KEEPALIVE_LINGER_S", 0.05)
    server, client = _tcp_pair()
    with server, client, ThreadPoolExecutor(1) as pool:
        worker = _lingering_worker(pool)
        started = time.monotonic()
        assert not worker._next_request_here(_Conn(server))
        assert 0.04 <= time.monotonic() - started < 2.0  # waited the linger, no longer
        monkeypatch.setattr(balanced, "KEEPALIVE_LINGER_S", 0.0)  # GUNICORN_KEEPALIVE_LINGER_MS=0: off
        client.sendall(b"GET /health HTTP/1.1\r\n\r\n")
        assert not worker._next_request_here(_Conn(server))
        assert not worker._next_request_here(_Conn(server, b"GET / HTTP/1.1\r\n"))


def test_the_thread_never_keeps_a_connection_while_others_wait_or_the_worker_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(balanced, "KEEPALIVE_LINGER_S", 5.0)
    server, client = _tcp_pair()
    release = threading.Event()
    with server, client, ThreadPoolExecutor(1) as pool:
        try:
            worker = _lingering_worker(pool)
            pool.submit(release.wait, 30)  # the pool's only thread is busy...
            queued = pool.submit(lambda: None)  # ...and another connection waits for it
            client.sendall(b"GET /health HTTP/1.1\r\n\r\n")
            started = time.monotonic()
            assert not worker._next_request_here(_Conn(server))  # back in the queue, in its turn
            # A client that pipelines (its next request already read) waits its turn too: served
            # at once, it would keep the thread for as long as it sends, and starve the others.
            assert not worker._next_request_here(_Conn(server, b"GET / HTTP/1.1\r\n"))
            release.set()
            queued.result(timeout=5)
            worker.alive = False  # stopping: the main loop answers with "Connection: close"
            assert not worker._next_request_here(_Conn(server))
            assert time.monotonic() - started < 4.0
        finally:
            release.set()


def test_handle_serves_each_request_that_follows_and_resets_the_header_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = iter([True, True, False])  # two keep-alive responses, then the client closes
    served: list[float | None] = []

    def handle_one(self: BalancedThreadWorker, conn: Any) -> bool:
        served.append(conn.sock.deadline)  # the headers' deadline, set afresh for each request
        conn.sock.deadline = None
        return next(answers)

    monkeypatch.setattr(balanced.ThreadWorker, "handle", handle_one)
    server, client = _tcp_pair()
    with server, client, ThreadPoolExecutor(1) as pool:
        worker = _lingering_worker(pool)
        monkeypatch.setattr(worker, "_next_request_here", lambda conn: True)
        conn = _Conn(balanced._ReadDeadline(server))
        assert worker.handle(conn) is False
    assert len(served) == 3 and all(deadline is not None for deadline in served)
