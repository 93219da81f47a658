"""Forward passes running on this machine, seen across the web workers (shared memory).

A worker's interpreter runs on its share of the cores (cores / workers) so that busy workers do
not oversubscribe the CPU. A pass that runs alone may use every core instead (encoders/litert.py):
a lone query's p50 is 1.3-1.9 ms lower (bench request_path). Alone means this worker runs no
other pass, and no other worker runs one now or started or ended one in the last QUIET_S: under
load the workers' passes follow each other within milliseconds, and one that took every core
would slow the next one's (an early version that asked only "none runs now" cost 4-6% of the
requests/s at 8 and 32 clients; with the quiet time requests/s are the same on and off).
Passes of job child processes and of TensorFlow-served versions are not counted.

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
_mine: int | None = 0  # this process's slot; None: a worker left without one
_lock = threading.Lock()  # this process's threads; other processes only read its slot
_now = time.monotonic


def share(slots: int) -> None:
    """Make `slots` slots the processes forked from now on share (in the parent, before the fork)."""
    global _slots
    _slots = multiprocessing.Array("d", slots * FIELDS, lock=False)


def use_slot(slot: int | None) -> None:
    """This process writes its passes into `slot` (a worker, after the fork), from a clean start
    (its last owner may have gone without child_exit); None: it has none, and since the others
    cannot see its passes, none of them is ever alone."""
    global _mine
    _mine = slot
    if slot is not None:
        _slots[slot * FIELDS : (slot + 1) * FIELDS] = [0.0] * FIELDS


def clear(slot: int) -> None:
    """Forget a slot's passes (its worker exited, maybe in the middle of one)."""
    _slots[slot * FIELDS + RUNNING] = 0.0


@contextmanager
def forward() -> Iterator[bool]:
    """Count a pass while it runs; yields whether it runs alone on the machine."""
    if _mine is None:
        yield False
        return
    base = _mine * FIELDS
    with _lock:
        # Published before the others are read: two workers starting at once then both see the
        # other, and neither takes every core (the safe side of the tie).
        now = _now()
        _slots[base + RUNNING] += 1
        _slots[base + STARTED] = now
        alone = _slots[base + RUNNING] == 1 and _others_quiet(base, now)
    try:
        yield alone
    finally:
        with _lock:
            _slots[base + ENDED] = _now()  # before the count drops: never "none ran" in between
            _slots[base + RUNNING] -= 1


def _others_quiet(base: int, now: float) -> bool:
    """No other slot runs a pass, or started or ended one within QUIET_S. Reads take no lock: each
    value is one aligned 8-byte double, seen before or after a write."""
    values = _slots[:]
    for other in range(0, len(values), FIELDS):
        if other == base:
            continue
        running, started, ended = values[other : other + FIELDS]
        if running > 0 or now - max(started, ended) < QUIET_S:
            return False
    return True
