"""Gunicorn settings for the Procfile (and `python -m service serve`), sized from the environment.

The app is NOT preloaded: each worker builds it after the fork (its threads, and TensorFlow where
a version needs it, are not fork-safe: gunicorn#2369). Workers x threads per forward pass = the cores.
"""

import os
import tempfile
from typing import Any

from service.core import inflight
from service.server import worker as balanced

# Loopback unless told (HOST): nothing buffers slow clients in front of a bare gunicorn. On Elastic
# Beanstalk (the aws profile) nginx on the same instance does, and must reach the port.
DEFAULT_HOST = "0.0.0.0" if os.environ.get("SERVICE_PROFILE") == "aws" else "127.0.0.1"
bind = f"{os.environ.get('HOST', DEFAULT_HOST)}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threads let one worker answer /health and queries while a request is encoding; the gthread
# worker, balanced so keep-alive clients spread evenly over the workers (server/worker.py).
worker_class = "service.server.worker.BalancedThreadWorker"
# Many threads per worker: concurrent requests are batched into one forward pass (encoders/batching.py),
# so more requests in flight means bigger, cheaper batches.
threads = int(os.environ.get("GUNICORN_THREADS", "16"))
preload_app = False
# Queries take milliseconds; training runs in a background thread, never inside a request.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
graceful_timeout = 30
keepalive = 5
# A line per request costs a write on the hot path; nginx (on Elastic Beanstalk) logs requests
# anyway. GUNICORN_ACCESS_LOG=1 turns it on.
accesslog = "-" if os.environ.get("GUNICORN_ACCESS_LOG", "0").lower() in ("1", "true", "yes") else None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()

# Split the cores between workers so they do not oversubscribe the CPU.
os.environ.setdefault("TF_INTRA_OP_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
os.environ.setdefault("TF_INTER_OP_THREADS", "1")
# Gunicorn's control socket lives at one fixed path per user; several servers on one machine
# (tests, make run beside a deploy) would fight over it, and nothing here uses it.
control_socket_disable = True

# Metrics: every worker writes its own into one folder that GET /metrics reads whole (prometheus
# multi-process mode). A fresh folder per server start: series of workers from before never mix in.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="simsvc-metrics-")

# One slot per worker in shared memory (room for workers added with TTIN), claimed in pre_fork:
# its connections (the balanced worker's table) and its forward passes (a pass alone may use
# every core).
SLOTS = 2 * workers + 8
balanced.table = balanced.ConnectionTable(slots=SLOTS)
inflight.share(slots=SLOTS)


def post_worker_init(worker: Any) -> None:  # gunicorn's hook: the app (and NumPy) is loaded
    # NumPy's BLAS (OpenBLAS in the wheels) runs every product on a thread per core; a query's
    # products are small (a head's two layers, a whitening) and those threads spin between them:
    # measured in bench/request_path.py, the head in NumPy cost ~10 CPU-ms a query that way. One
    # BLAS thread in a web worker; a job's child process (spawned, its own BLAS) keeps them all.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def pre_fork(server: Any, worker: Any) -> None:  # gunicorn's hook: its Arbiter and Worker
    assert balanced.table is not None  # made above, when gunicorn read this file
    taken = {w.balance_slot for w in server.WORKERS.values()}
    worker.balance_slot = balanced.table.claim(taken)


def post_fork(server: Any, worker: Any) -> None:  # gunicorn's hook, in the new worker
    inflight.use_slot(worker.balance_slot)


def child_exit(server: Any, worker: Any) -> None:
    assert balanced.table is not None
    balanced.table.release(worker.balance_slot)
    if worker.balance_slot is not None:  # it may have died in the middle of a pass
        inflight.clear(worker.balance_slot)
    from prometheus_client import multiprocess  # after the folder is set, in the master only

    multiprocess.mark_process_dead(worker.pid)  # its live gauges leave /metrics
