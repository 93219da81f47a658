"""Forward passes seen across processes (core/inflight.py): what lets a lone pass use every core."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from typing import Any

import pytest

from service.core import inflight


@pytest.fixture
def slots(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Three workers' slots as gunicorn's config makes them before the fork; this process is 0."""
    monkeypatch.setattr(inflight, "_slots", inflight._slots)
    monkeypatch.setattr(inflight, "_mine", 0)
    inflight.share(3)
    inflight.use_slot(0)
    yield


def _worker_pass(slot: int, started: Any, release: Any) -> None:  # a forked worker; two Events
    inflight.use_slot(slot)
    with inflight.forward():
        started.set()
        release.wait(30)


def _fork(slot: int) -> tuple[Any, Any, Any]:
    context = multiprocessing.get_context("fork")  # how gunicorn makes its workers
    started, release = context.Event(), context.Event()
    worker = context.Process(target=_worker_pass, args=(slot, started, release))
    worker.start()
    assert started.wait(30), "the worker did not start its pass"
    return worker, started, release


def test_a_pass_is_alone_unless_another_runs_here_or_in_another_worker(slots: None) -> None:
    with inflight.forward() as alone:
        assert alone
        with inflight.forward() as also:
            assert not also  # two in this worker
    worker, _, release = _fork(1)
    try:
        with inflight.forward() as alone:
            assert not alone  # the other worker's pass runs now
    finally:
        release.set()
        worker.join(30)


def test_a_pass_right_after_another_workers_is_not_alone_until_quiet(
    slots: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, _, release = _fork(2)
    release.set()
    worker.join(30)  # its pass has ended; when, the slot says
    ended = inflight._slots[2 * inflight.FIELDS + inflight.ENDED]
    monkeypatch.setattr(inflight, "_now", lambda: ended + inflight.QUIET_S / 2)
    with inflight.forward() as alone:
        assert not alone  # under load the next pass starts within milliseconds
    with inflight.forward() as alone:
        assert not alone  # this worker's own passes do not hide the other's
    monkeypatch.setattr(inflight, "_now", lambda: ended + 2 * inflight.QUIET_S)
    with inflight.forward() as alone:
        assert alone


def test_a_worker_that_died_mid_pass_stops_counting_once_cleared(
    slots: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker, _, _ = _fork(1)
    worker.kill()  # in the middle of its pass: its slot still says running
    worker.join(30)
    started = inflight._slots[1 * inflight.FIELDS + inflight.STARTED]
    monkeypatch.setattr(inflight, "_now", lambda: started + 60)
    with inflight.forward() as alone:
        assert not alone  # a minute on, still "running"
    inflight.clear(1)  # gunicorn's child_exit hook
    with inflight.forward() as alone:
        assert alone


def test_a_pass_that_ended_a_moment_ago_counts_however_long_ago_it_started(
    slots: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, now = 1 * inflight.FIELDS, 1000.0
    inflight._slots[base + inflight.STARTED] = now - 1.0  # a long pass (a batch) ...
    inflight._slots[base + inflight.ENDED] = now - inflight.QUIET_S / 2  # ... that just ended
    monkeypatch.setattr(inflight, "_now", lambda: now)
    with inflight.forward() as alone:
        assert not alone


def test_a_slot_taken_over_starts_clean(slots: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its last worker went without child_exit (gunicorn's kill_worker on ESRCH): a count left behind.
    inflight._slots[1 * inflight.FIELDS + inflight.RUNNING] = 1.0
    monkeypatch.setattr(inflight, "_now", lambda: 1000.0)
    with inflight.forward() as alone:
        assert not alone
    inflight.use_slot(1)  # the next worker there (in this test, this process)
    monkeypatch.setattr(inflight, "_now", lambda: 2000.0)  # past slot 0's pass just now
    with inflight.forward() as alone:
        assert alone


def test_a_worker_without_a_slot_never_takes_every_core(slots: None) -> None:
    # The others cannot see its passes, so none of its passes may count as alone.
    inflight.use_slot(None)
    with inflight.forward() as alone:
        assert not alone


def test_outside_gunicorn_a_process_sees_only_its_own_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inflight, "_slots", [0.0] * inflight.FIELDS)  # share() never ran
    monkeypatch.setattr(inflight, "_mine", 0)
    with inflight.forward() as alone, inflight.forward() as also:
        assert alone and not also
    with inflight.forward() as alone:
        assert alone
