"""Where a query's CPU time goes, inside and outside the encoder, in a real gunicorn worker.

One worker of the Procfile's gunicorn answers wrk's load. The worker's CPU time (from /proc)
divided by the requests it answered is the whole cost of a request; py-spy samples the worker
meanwhile (only while a thread runs), and each sample is counted for the part of the service
that its innermost recognised frame belongs to (encoder, decoding, head, index, results and
JSON, metrics, Flask, gunicorn). The split is those counts' shares of the CPU time.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from bench import demo

# A sample's part: the first pattern found walking from its innermost frame outwards.
PARTS = (
    ("encoder (LiteRT invoke)", ("ai_edge_litert", "encoders/litert.py", "encoders/batching.py")),
    ("encoder (TensorFlow)", ("tensorflow/", "encoders/__init__.py")),
    ("decode + resize (PIL)", ("PIL/", "catalog/images.py")),
    ("head (NumPy)", ("catalog/head.py", "core/vectors.py")),
    ("index (Annoy)", ("annoy", "catalog/index.py")),
    (
        "results, maps, JSON",
        ("serving/query.py", "jsonmap.py", "json/", "filters.py", "api/bodies.py", "api/rules.py"),
    ),
    ("metrics, logs", ("prometheus_client", "core/metrics.py", "logging/", "core/logs.py")),
    ("Flask, Werkzeug, marshmallow", ("flask/", "werkzeug/", "marshmallow/", "webargs/", "flask_smorest/")),
    ("service HTTP layer", ("service/api/",)),
    ("gunicorn (sockets, HTTP parsing)", ("gunicorn/", "server/worker.py", "socket.py", "selectors.py")),
)


# Leaf frames of a thread that waits (py-spy's idle filter misses some): not CPU time.
IDLE = ("threading.py", "concurrent/futures/thread.py:81", "queue.py", "selectors.py:4")


def part_of(stack: str) -> str | None:
    frames = stack.split(";")
    if any(p in frames[-1] for p in IDLE):
        return None
    for frame in reversed(frames):
        for name, patterns in PARTS:
            if any(p in frame for p in patterns):
                return name
    return "other"


def query_body() -> bytes:
    """The load's request body: one Fashion-MNIST test image as a 28x28 PNG."""
    images, _ = demo.load_fashion_mnist("t10k")
    png = io.BytesIO()
    Image.fromarray(images[0]).save(png, format="PNG")
    return png.getvalue()


def worker_cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") * 1000  # utime + stime


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(os.sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise RuntimeError("bench needs py-spy (pip install py-spy; `make bench` installs it)")
    return found


def split(url: str, pid: int, body_file: Path, wrk_run: Any, seconds: int = 8) -> dict[str, Any]:
    """CPU-ms per request of one gunicorn worker under wrk (4 connections), split by part."""
    script = body_file.with_suffix(".lua")
    env = {**os.environ, "BODY_FILE": str(body_file), "BODY_TYPE": "image/png"}
    wrk_run(url, script, env, 4, 3)  # warm-up
    samples = body_file.with_name("samples.txt")
    spy = subprocess.Popen(
        [
            py_spy(),
            "record",
            "-p",
            str(pid),
            "-d",
            str(seconds),
            "-r",
            "200",
            "-f",
            "raw",
            "-o",
            str(samples),
            "--nonblocking",  # never pause the worker to sample it (that would cost it time)
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    result: dict[str, Any] = {}
    before = worker_cpu_ms(pid)
    load = threading.Thread(target=lambda: result.update(wrk_run(url, script, env, 4, seconds + 1)))
    load.start()
    load.join()
    used = worker_cpu_ms(pid) - before
    spy.wait(timeout=60)
    answered = result["requests_per_s"] * (seconds + 1)
    cpu_ms = used / answered
    counts: Counter[str] = Counter()
    for line in samples.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        part = part_of(stack) if stack and n.isdigit() else None
        if part is not None:
            counts[part] += int(n)
    total = sum(counts.values()) or 1
    return {
        "requests_per_s": result["requests_per_s"],
        "cpu_ms": round(cpu_ms, 3),
        "samples": total,
        "parts_ms": {name: round(cpu_ms * n / total, 3) for name, n in counts.most_common()},
    }
