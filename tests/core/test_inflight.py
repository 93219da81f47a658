"""Forward passes counted across processes (core/inflight.py): what lets a lone pass use every core."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from typing import Any

import pytest

from service.core import inflight


@pytest.fixture
def shared(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(inflight, "_shared", None)
    inflight.share()  # as gunicorn's config does before it forks the workers
    yield


def _one_pass(started: Any, release: Any) -> None:  # two multiprocessing Events
    with inflight.forward():
        started.set()
        release.wait(30)


def test_a_pass_is_alone_unless_another_runs_or_another_worker_just_started_one(
    shared: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inflight, "QUIET_S", 0.2)
    with inflight.forward() as alone:
        assert alone
        with inflight.forward() as also:
            assert not also  # two run in this process
    with inflight.forward() as alone:
        assert alone  # this process's own last pass does not count
    context = multiprocessing.get_context("fork")  # how gunicorn makes its workers
    started, release = context.Event(), context.Event()
    worker = context.Process(target=_one_pass, args=(started, release))
    worker.start()
    try:
        assert started.wait(30)
        with inflight.forward() as alone:
            assert not alone  # the other worker's pass runs now
    finally:
        release.set()
        worker.join(30)
    worker = context.Process(target=_one_pass, args=(started, release))  # starts, ends at once
    worker.start()
    worker.join(30)
    with inflight.forward() as alone:
        assert not alone  # none runs, but the other worker started one a moment ago: under load
    time.sleep(0.25)
    with inflight.forward() as alone:
        assert alone  # quiet for QUIET_S


def test_without_sharing_the_count_is_this_processs_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inflight, "_shared", None)
    with inflight.forward() as alone, inflight.forward() as also:
        assert alone and not also
    with inflight.forward() as alone:
        assert alone
