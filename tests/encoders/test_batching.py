"""Batching across concurrent calls: each caller gets its own rows; batched equals one by one."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flask.testing import FlaskClient

from bench import demo
from service.encoders.batching import Batcher
from tests.helpers import TEST_PHOTOS


def test_concurrent_calls_share_passes_and_get_their_own_rows() -> None:
    def slow_double(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.02)  # long enough for the other callers to queue up
        return batch * 2

    batcher = Batcher(slow_double, max_batch=64)
    results: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        results[i] = batcher(np.full((1 + i % 3, 2), i, dtype=np.float32))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, out in results.items():
        assert out.shape == (1 + i % 3, 2) and np.all(out == 2 * i)
    assert batcher.passes < 24  # calls were merged into shared passes


def test_a_lone_call_runs_at_once() -> None:
    batcher = Batcher(lambda b: b + 1)
    started = time.perf_counter()
    assert batcher(np.zeros((1, 1))).tolist() == [[1.0]]
    assert batcher.passes == 1 and time.perf_counter() - started < 0.5


def test_batches_respect_the_size_cap() -> None:
    sizes: list[int] = []
    gate = threading.Event()

    def forward(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        gate.wait(1)
        return batch

    batcher = Batcher(forward, max_batch=4)
    threads = [threading.Thread(target=batcher, args=(np.zeros((1, 1)),)) for _ in range(9)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join()
    assert sum(sizes) == 9 and max(sizes) <= 4


def test_errors_reach_every_waiting_caller() -> None:
    def broken(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.01)
        raise RuntimeError("boom")

    batcher = Batcher(broken)
    errors: list[str] = []

    def call() -> None:
        try:
            batcher(np.zeros((1, 1)))
        except RuntimeError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=call) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert errors == ["boom"] * 5
    with pytest.raises(RuntimeError, match="boom"):  # not left stuck: the next call runs (and fails)
        batcher(np.zeros((1, 1)))


@pytest.mark.parametrize("concurrent", [False, True])
def test_batched_inference_matches_one_by_one(
    trained: FlaskClient, concurrent: bool, photos_zip: Path
) -> None:
    photos = {name: demo.jpeg(demo.photo(name)) for name in TEST_PHOTOS}
    alone = {
        name: trained.post("/food/infer?k=5", data=data, content_type="image/jpeg").get_json()["results"]
        for name, data in photos.items()
    }
    if concurrent:
        together: dict[str, list] = {}

        def ask(name: str) -> None:
            client = trained.application.test_client()
            response = client.post("/food/infer?k=5", data=photos[name], content_type="image/jpeg")
            together[name] = response.get_json()["results"]

        threads = [threading.Thread(target=ask, args=(n,)) for n in photos for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        parts = [(io.BytesIO(data), f"{name}.jpg") for name, data in photos.items()]
        body = trained.post("/food/infer?k=5", data={"image": parts}).get_json()
        together = {entry["filename"][:-4]: entry["results"] for entry in body["batch"]}
    for name in photos:
        assert [r["id"] for r in together[name]] == [r["id"] for r in alone[name]]
        assert [r["score"] for r in together[name]] == pytest.approx(
            [r["score"] for r in alone[name]], abs=1e-4
        )
        assert together[name][0]["name"] == f"{name}/{name}-original.jpg"


def _gated(batcher_kwargs: dict) -> tuple[Batcher, threading.Event, list[int]]:
    """A batcher whose forward passes block until `gate` is set, recording each pass's size."""
    gate = threading.Event()
    sizes: list[int] = []

    def forward(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        gate.wait(10)
        return batch

    return Batcher(forward, **batcher_kwargs), gate, sizes


def _start(batcher: Batcher, count: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=batcher, args=(np.zeros((1, 1)),)) for _ in range(count)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # one after another, as closed-loop clients come back
    return threads


def _prime(batcher: Batcher, gate: threading.Event, callers: int) -> None:
    """Leave the batcher having just served `callers` callers in one pass."""
    gate.clear()
    threads = _start(batcher, callers + 1)  # the first runs alone; the rest queue behind it
    gate.set()
    for t in threads:
        t.join(10)


def test_under_load_a_pass_waits_for_the_callers_it_expects() -> None:
    # A window far longer than the test: without it, the three callers below would each run a
    # pass of their own as they come in one by one.
    batcher, gate, sizes = _gated({"window_s": 30, "busy_gap_s": 30})
    _prime(batcher, gate, callers=3)
    assert sizes == [1, 3]
    threads = _start(batcher, 3)
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert sizes == [1, 3, 3]


def test_a_pass_after_an_idle_spell_does_not_wait() -> None:
    batcher, gate, sizes = _gated({"window_s": 30, "busy_gap_s": 0.01})
    _prime(batcher, gate, callers=3)
    time.sleep(0.1)  # idle for longer than the busy gap
    lone = threading.Thread(target=batcher, args=(np.zeros((1, 1)),))
    lone.start()
    lone.join(10)  # it would sit out the 30 s window if it waited for company
    assert not lone.is_alive() and sizes == [1, 3, 1]


def test_one_caller_at_a_time_never_waits() -> None:
    batcher = Batcher(lambda b: b, window_s=30, busy_gap_s=30)
    done = threading.Event()

    def sequential() -> None:
        for _ in range(20):
            batcher(np.zeros((1, 1)))
        done.set()

    threading.Thread(target=sequential, daemon=True).start()
    assert done.wait(10) and batcher.passes == 20


def test_a_failure_before_the_pass_leaves_no_dead_leader(monkeypatch: pytest.MonkeyPatch) -> None:
    batcher = Batcher(lambda b: b + 1)
    real_wait = batcher._wait_for_company
    monkeypatch.setattr(batcher, "_wait_for_company", lambda: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(MemoryError):
        batcher(np.zeros((1, 1)))
    monkeypatch.setattr(batcher, "_wait_for_company", real_wait)
    done = threading.Event()
    threading.Thread(target=lambda: (batcher(np.zeros((1, 1))), done.set()), daemon=True).start()
    assert done.wait(10)  # the next caller leads and is answered
