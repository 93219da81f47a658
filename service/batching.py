"""Batching across concurrent requests: one forward pass for every image waiting, no waiting when idle.

The first caller to find the encoder idle becomes the leader and runs a pass at once with
whatever is queued (just its own image when the server is quiet). Callers arriving while a pass
runs queue up, and the next pass takes all of them together. A leader runs passes only until its
own call is answered, then hands over to a waiting caller, so under steady load no request is
held back serving others. Batches form only under load, exactly as large as the load makes them,
with no timer and no added latency for a lone request.
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
    wake: threading.Event = field(default_factory=threading.Event)  # done, or made leader
    done: bool = False
    leads: bool = False
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
            if not self._running:
                self._running = call.leads = True  # idle: this caller leads
        if not call.leads:
            call.wake.wait()  # answered by the leader's pass, or handed the lead
        if call.leads:
            try:
                while not call.done:
                    self._run_pass()
            finally:
                self._hand_over()
        if call.error is not None:
            raise call.error
        assert call.output is not None
        return call.output

    def _hand_over(self) -> None:
        """Give the lead to the oldest waiting call (only it wakes), or go idle."""
        with self._lock:
            if self._queue:
                successor = self._queue[0]
                successor.leads = True
                successor.wake.set()
            else:
                self._running = False

    def _run_pass(self) -> None:
        """Take what is queued (up to max_batch images) and run one forward pass for it."""
        with self._lock:
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
            call.done = True
            call.wake.set()
