"""Forward passes running now on this machine, counted across the web workers (shared memory).

A worker's interpreter runs on its share of the cores (cores / workers) so that busy workers do
not oversubscribe the CPU. A pass that runs alone may use every core instead (encoders/litert.py):
a lone query answers in about half the time. Alone means no other pass runs now and no other
process started one in the last QUIET_S: under load the workers' passes follow each other within
milliseconds, and one that took every core would slow the next one's (measured: 4-6% fewer
requests/s at 8 and 32 clients when only "none runs now" was asked). Gunicorn's config calls
`share()` before it forks the workers; without it (tests, the CLI, a job's child process) the
count covers this process only.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

QUIET_S = 0.010  # a worker under load starts a pass every few milliseconds

RUNNING, STARTED_AT, STARTED_BY = range(3)  # the shared slots: passes now, the last start and its pid
_shared: Any = None  # a multiprocessing.Array shared by the forked workers, once share() ran
_local = [0.0, 0.0, 0.0]
_local_lock = threading.Lock()


def share() -> None:
    """Count across the processes forked from now on (call it in the parent, before the fork)."""
    global _shared
    _shared = multiprocessing.Array("d", 3)  # with its own lock: updates are atomic


@contextmanager
def forward() -> Iterator[bool]:
    """Count a pass while it runs; yields whether it runs alone on the machine."""
    slots, lock = (_shared, _shared.get_lock()) if _shared is not None else (_local, _local_lock)
    me, now = float(os.getpid()), time.monotonic()
    with lock:
        slots[RUNNING] += 1
        alone = slots[RUNNING] == 1 and (slots[STARTED_BY] in (me, 0.0) or now - slots[STARTED_AT] > QUIET_S)
        slots[STARTED_AT], slots[STARTED_BY] = now, me
    try:
        yield alone
    finally:
        with lock:
            slots[RUNNING] -= 1
