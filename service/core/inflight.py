"""Forward passes running on this machine, seen across the web workers (shared memory).

A worker's interpreter runs on its share of the cores (cores / workers) so that busy workers do
not oversubscribe the CPU. A pass that runs alone may use every core instead (encoders/litert.py):
measured, a lone query's p50 fell from 5.1-5.9 to 4.0 ms. Alone means this worker runs no other
pass, and no other worker runs one now or started or ended one in the last QUIET_S: under load
the workers' passes follow each other within milliseconds, and one that took every core would
slow the next one's (4-6% fewer requests/s at 8 and 32 clients when only "none runs now" was
asked; none with the quiet time).

Each worker writes only its own slot (running passes, last start, last end), so no lock is
shared between processes: a worker killed mid-pass can neither hold one nor leave a count
behind for long, since gunicorn's child_exit hook clears its slot. Gunicorn's config calls
`share()` before it forks the workers and `use_slot()` in each; without them (tests, the CLI, a
job's child process) a process sees only its own passes.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

QUIET_S = 0.010  # a worker under load starts a pass every few milliseconds
FIELDS = 3  # per slot: passes running, last start, last end (time.monotonic: one clock machine-wide)
RUNNING, STARTED, ENDED = range(FIELDS)

_slots: Any = [0.0] * FIELDS  # a multiprocessing.Array shared by the forked workers, once share() ran
_mine = 0  # this process's slot
_lock = threading.Lock()  # this process's threads; other processes only read its slot
_now = time.monotonic


def share(slots: int) -> None:
    """Make `slots` slots the processes forked from now on share (in the parent, before the fork)."""
    global _slots
    _slots = multiprocessing.Array("d", slots * FIELDS, lock=False)


def use_slot(slot: int | None) -> None:
    """This process writes its passes into `slot` (a worker, after the fork); None: it has none,
    and sees only its own passes."""
    global _mine, _slots
    if slot is None:
        _mine, _slots = 0, [0.0] * FIELDS
    else:
        _mine = slot


def clear(slot: int) -> None:
    """Forget a slot's passes (its worker exited, maybe in the middle of one)."""
    _slots[slot * FIELDS + RUNNING] = 0.0


@contextmanager
def forward() -> Iterator[bool]:
    """Count a pass while it runs; yields whether it runs alone on the machine."""
    base = _mine * FIELDS
    with _lock:
        now = _now()
        alone = _slots[base + RUNNING] == 0 and _others_quiet(base, now)
        _slots[base + RUNNING] += 1
        _slots[base + STARTED] = now
    try:
        yield alone
    finally:
        with _lock:
            _slots[base + RUNNING] -= 1
            _slots[base + ENDED] = _now()


def _others_quiet(base: int, now: float) -> bool:
    """No other slot runs a pass, or started or ended one within QUIET_S (reads are not locked:
    a slot being written is seen before or after, either of which is a fair answer)."""
    values = _slots[:]
    for other in range(0, len(values), FIELDS):
        if other == base:
            continue
        running, started, ended = values[other : other + FIELDS]
        if running > 0 or now - max(started, ended) < QUIET_S:
            return False
    return True
