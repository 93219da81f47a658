"""Balancing keep-alive connections over gunicorn workers: the shared table and the hand-back rule."""

from __future__ import annotations

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


def test_a_response_the_client_never_reads_is_cut_after_the_stall_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket
    import threading
    import time

    monkeypatch.setattr(balanced, "WRITE_STALL_S", 0.3)
    server, client = socket.socketpair()
    with server, client:
        server.setblocking(True)
        wrapped = balanced._ReadDeadline(server)
        wrapped.sendall(b"x" * 1000)  # room in the buffers: sent at once
        assert client.recv(2000) == b"x" * 1000
        failures: list[BaseException] = []

        def write() -> None:
            try:
                wrapped.sendall(b"y" * 50_000_000)  # far more than the buffers hold, never read
            except OSError as exc:
                failures.append(exc)

        started = time.monotonic()
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join(5)
        assert not writer.is_alive(), "the write waited for a client that never reads"
        assert 0.3 <= time.monotonic() - started < 5 and wrapped.cut
        assert isinstance(failures[0], BrokenPipeError) and "took none of its response" in str(failures[0])


def test_a_client_that_reads_slowly_gets_all_of_its_response(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import threading
    import time

    monkeypatch.setattr(balanced, "WRITE_STALL_S", 1.0)
    server, client = socket.socketpair()
    got = bytearray()

    def read() -> None:
        while len(got) < 4_000_000:
            got.extend(client.recv(500_000))
            time.sleep(0.05)  # slowly, but it reads

    with server, client:
        reader = threading.Thread(target=read)
        reader.start()
        balanced._ReadDeadline(server).sendall(b"z" * 4_000_000)
        reader.join(10)
    assert len(got) == 4_000_000
