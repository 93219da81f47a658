"""Batching across concurrent requests: one forward pass for every image waiting, no waiting when idle.

The first caller to find the encoder idle runs a forward pass at once with whatever is queued
(just its own image when the server is quiet). Callers that arrive while a pass runs queue up,
and the next pass takes all of them together. Batches form only under load, exactly as large as
the load makes them, with no timer and no added latency for a lone request.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Call:
    inputs: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    output: np.ndarray | None = None
    error: BaseException | None = None


class Batcher:
    """Wraps `forward` (a batch in, a batch out, row for row) so concurrent calls share passes."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], max_batch: int = 64) -> None:
        self.forward = forward
        self.max_batch = max_batch
        self._queue: deque[_Call] = deque()
        self._lock = threading.Lock()
        self._running = False
        self.passes = 0  # forward passes run (for tests and benchmarks)

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        call = _Call(inputs)
        with self._lock:
            self._queue.append(call)
            lead = not self._running
            self._running = True
        if lead:
            self._drain()
        call.done.wait()
        if call.error is not None:
            raise call.error
        assert call.output is not None
        return call.output

    def _drain(self) -> None:
        """Run passes until nothing is queued (on the thread of the call that found us idle)."""
        while True:
            with self._lock:
                if not self._queue:
                    self._running = False
                    return
                calls, size = [], 0
                while self._queue and (not calls or size + len(self._queue[0].inputs) <= self.max_batch):
                    call = self._queue.popleft()
                    calls.append(call)
                    size += len(call.inputs)
            try:
                batch = calls[0].inputs if len(calls) == 1 else np.concatenate([c.inputs for c in calls])
                outputs = self.forward(batch)
                self.passes += 1
                start = 0
                for call in calls:
                    call.output = outputs[start : start + len(call.inputs)]
                    start += len(call.inputs)
            except BaseException as exc:  # every waiting caller gets the error, none hangs
                for call in calls:
                    call.error = exc
            for call in calls:
                call.done.set()
