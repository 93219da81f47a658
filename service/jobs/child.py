"""Run a training job's work in a child process: web workers never load TensorFlow.

Training needs TensorFlow (TF-Hub models, conversion, the head); serving a converted version does
not. Run in a thread of a web worker, a job would leave that worker holding TensorFlow's few
hundred MB for the rest of its life. A fresh child process (spawned, not forked: TensorFlow is
not fork-safe) does the work and exits, returning its memory; progress and the outcome come back
over a pipe, so the job runner sees the same calls and exceptions as in a thread. A child that
dies (out of memory, killed) fails the job with its exit code; one that outlives the job's time
limit is killed.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from service.core import logs
from service.core.config import Settings
from service.core.endpoint import EndpointSpec
from service.core.errors import ServiceError, TrainingError
from service.encoders import litert
from service.encoders.tfruntime import configure_threads
from service.storage import open_storage
from service.training import changes, compaction
from service.training.results import ChangeResult, ProgressFn, TrainResult
from service.training.train import train

log = logging.getLogger(__name__)

# How long past JOB_MAX_S a child may run before it is killed (it checks the limit itself first).
KILL_GRACE_S = 60.0

Work = TrainResult | ChangeResult


def run_job(
    settings: Settings,
    spec: EndpointSpec,
    zip_path: Path,
    on_progress: ProgressFn,
    version: str,
    fine_tune: str,
    kind: str,
    on_duplicate: str = "allow",
) -> Work:
    """Run `work` (below) in a child process; the same result or exception as running it here."""
    return run_in_child(
        settings,
        spec,
        on_progress,
        work,
        zip_path,
        on_progress,
        version,
        fine_tune,
        kind,
        None,
        True,
        on_duplicate,
    )


def run_in_child(
    settings: Settings, spec: EndpointSpec, on_progress: ProgressFn, fn: Callable[..., Any], *args: Any
) -> Any:
    """`fn(settings, spec, *args)` in a child process (`fn`: a module-level function; an argument
    equal to `on_progress` is replaced there by a function sending progress back over the pipe).
    An exception raised by `on_progress` here (a cancellation) kills the child and propagates."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    portable = tuple(_PROGRESS if a is on_progress else a for a in args)
    child = context.Process(
        target=_child,
        args=(settings, spec, fn, portable, sender, os.getpid()),
        name=f"job-{spec.name}",
        daemon=True,  # goes when this worker goes
    )
    child.start()
    sender.close()  # the child holds the only sending end: EOF here means it has exited
    deadline = time.monotonic() + settings.job_max_s + KILL_GRACE_S
    outcome: tuple[str, Any] | None = None
    try:
        while outcome is None:
            if time.monotonic() > deadline:  # checked every turn: a chatty child is no exception
                child.kill()
                raise TrainingError(f"the job ran over its time limit (JOB_MAX_S={settings.job_max_s:g} s)")
            if not receiver.poll(1.0):
                continue
            try:
                tag, payload = receiver.recv()
            except EOFError:
                break
            if tag == "progress":
                on_progress(payload)
            else:
                outcome = (tag, payload)
    except BaseException:
        child.kill()  # stopped here (a cancellation): nothing more of its work may land
        raise
    finally:
        receiver.close()
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
            child.join()
        if child.exitcode != 0:  # killed (out of memory?) or crashed: its scratch files are ours to remove
            remove_leftovers_of(settings.cache_dir, child.pid)
    if outcome is None:
        code = child.exitcode
        how = f"was killed by signal {-code} (out of memory?)" if code and code < 0 else f"exited with {code}"
        raise RuntimeError(f"the training process {how} before it finished")
    tag, payload = outcome
    if tag == "error":
        raise payload
    return payload


def remove_leftovers_of(cache_dir: Path, pid: int | None) -> None:
    """Delete the uploads, work folders and half-written conversions a process left behind."""
    if pid is None:
        return
    for folder in (cache_dir / "uploads", cache_dir / "work"):
        for path in folder.glob(f"{pid}-*") if folder.is_dir() else []:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    for part in (cache_dir / "converted").glob(f"*.{pid}.part"):
        part.unlink(missing_ok=True)


def work(
    settings: Settings,
    spec: EndpointSpec,
    zip_path: Path,
    on_progress: ProgressFn,
    version: str,
    fine_tune: str,
    kind: str,
    storage: Any = None,
    tensorflow: bool = True,
    on_duplicate: str = "allow",
) -> Work:
    """A job's work: train (replace the catalog) or add items; in whichever process runs it.
    `tensorflow=False`: an add that would load TensorFlow raises changes.NeedsTensorFlow instead."""
    # The spec the worker validated at start-up, not the endpoint file as it is now.
    if storage is None:
        storage = open_storage(
            settings.storage_uri, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
        )
    if kind == "add":
        return changes.add_items(
            spec, zip_path, storage, settings, on_progress, fine_tune, tensorflow, on_duplicate=on_duplicate
        )
    if kind == "compact":
        return compaction.compact(spec, storage, settings, on_progress)
    return train(
        spec, zip_path, storage, settings, on_progress, version, fine_tune, on_duplicate=on_duplicate
    )


_PROGRESS = "<progress>"  # stands for the progress callback among a child's arguments


def _child(
    settings: Settings,
    spec: EndpointSpec,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    conn: Connection,
    parent: int,
) -> None:
    _die_with(parent)
    # TensorFlow's converter writes temporary SavedModels under TMPDIR: give it a folder the worker
    # removes if this process is killed (remove_leftovers_of), and this process removes otherwise.
    scratch = settings.cache_dir / "work" / f"{os.getpid()}-tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = tempfile.tempdir = str(scratch)
    logs.configure(settings.log_level, settings.log_format)
    configure_threads(settings.tf_intra_op_threads, settings.tf_inter_op_threads)
    litert.configure_threads(settings.tf_intra_op_threads)
    send: Callable[[str, Any], None] = lambda tag, payload: conn.send((tag, payload))  # noqa: E731
    try:
        report: ProgressFn = lambda p: send("progress", p)  # noqa: E731
        result = fn(settings, spec, *(report if isinstance(a, str) and a == _PROGRESS else a for a in args))
        send("result", result)
    except BaseException as exc:  # every failure goes back to the job runner, as it would in a thread
        if not isinstance(exc, ServiceError):  # a bug: its traceback stays in this process's log
            log.exception("training job for %s failed", spec.name)
        send("error", _portable(exc))
    finally:
        conn.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _die_with(parent: int) -> None:
    """Linux: the kernel kills this process when the worker that started it dies, even by SIGKILL,
    so a job whose worker is gone never publishes behind its failed status."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the broken pipe stops it at its next report
        return
    if os.getppid() != parent:  # the worker died before prctl took effect
        os._exit(1)


def _portable(exc: BaseException) -> Exception:
    """What crosses the pipe: the service's own errors and Python's as they are; anything else
    (a TensorFlow error, whose unpickling would import TensorFlow into the web worker; an exit or
    an interrupt, which the job runner must record as a failure) as a RuntimeError naming it."""
    module = type(exc).__module__
    if isinstance(exc, Exception) and (module == "builtins" or module.startswith("service.")):
        try:
            pickle.loads(pickle.dumps(exc))
            return exc
        except Exception:
            pass
    return RuntimeError(f"{type(exc).__name__}: {exc}")
