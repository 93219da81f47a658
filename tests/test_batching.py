"""Batching across concurrent calls: each caller gets its own rows; batched equals one by one."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flask.testing import FlaskClient

from service import demo
from service.batching import Batcher

from .conftest import TEST_PHOTOS


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
