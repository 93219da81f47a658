"""Trains spread over the worker tier, measured side by side in one run on moto's S3 and SQS:

- one train of FANOUT_IMAGES Fashion-MNIST images (default 20,000) through the worker path
  (POST /train -> S3 -> SQS -> the SQS daemon's stand-in -> the Procfile's gunicorn, worker
  profile, one encoder thread per worker process), as one job on one worker process (today's
  path), sharded on one worker process, and sharded on two;
- the ratios the issue sets: two processes against one (speed-up), sharded against the
  single-instance path on one process (overhead); images per second of each.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import requests

from bench.size import Fashion
from service.core.config import ROOT
from tests.helpers import S3Server, Sqsd, procfile_server

IMAGES = int(os.environ.get("FANOUT_IMAGES", "20000"))


def one_train(
    work: Path, server: S3Server, zip_path: Path, processes: int, shard_images: int
) -> dict[str, Any]:
    sqs = boto3.client("sqs", endpoint_url=server.url)
    queue = sqs.create_queue(QueueName=f"bench-{os.urandom(4).hex()}")["QueueUrl"]
    env = {
        "SERVICE_ROLE": "worker",
        "STORAGE_URI": f"s3://{server.bucket()}/simsvc",
        "S3_ENDPOINT_URL": server.url,
        "JOB_QUEUE_URL": queue,
        "SQS_ENDPOINT_URL": server.url,
        "SHARD_IMAGES": str(shard_images),
        "WEB_CONCURRENCY": str(processes),
        "TF_INTRA_OP_THREADS": "1",
        "WARM_ON_START": "false",
        "MAX_UPLOAD_MB": "2048",
    }
    with procfile_server(work, env) as web:
        sqsd = Sqsd(sqs, queue, web.url, threads=processes, visibility_s=600)
        try:
            busy0, own0 = machine_busy(), own_cpu()
            started = time.perf_counter()
            with zip_path.open("rb") as f:
                answer = requests.post(
                    f"{web.url}/food/train",
                    files={"file": ("fashion.zip", f, "application/zip")},
                    data={"fine_tune": "never"},
                    timeout=300,
                ).json()
            while True:
                job = requests.get(answer["status_url"], timeout=30).json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.5)
            seconds = time.perf_counter() - started
            busy, own = machine_busy(), own_cpu()
        finally:
            sqsd.stop()
        log = web.log.read_text()
    assert job["status"] == "succeeded", job
    shards = job.get("shards", {}).get("total", 0)
    print(f"  {processes} process(es), {shards or 'no'} shards: {seconds:.1f} s", flush=True)
    cores = os.cpu_count() or 1
    result = {
        "seconds": round(seconds, 1),
        "rate": round(IMAGES / seconds, 1),
        "shards": shards,
        # How busy the whole machine was, and the share of it this process (moto's S3 and SQS,
        # the SQS daemon's stand-in) took: the workers compete with the store for the cores.
        "cpu_busy": round((busy[0] - busy0[0]) / max(1e-9, busy[1] - busy0[1]), 2),
        "store_share": round((own - own0) / (seconds * cores), 2),
    }
    phase = shard_phase(log)
    if phase:
        result["embed_phase_s"] = round(phase, 1)
        result["embed_rate"] = round(IMAGES / phase, 1)
    return result


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU ticks of the machine so far (/proc/stat)."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def shard_phase(log: str) -> float | None:
    """Seconds from the shards queued to the reducer claimed (the workers' log lines)."""
    stamps = {}
    for line in log.splitlines():
        for mark in ("shards queued", "reducer claimed"):
            if mark in line:
                stamps[mark] = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    if len(stamps) < 2:
        return None
    return stamps["reducer claimed"] - stamps["shards queued"]


def run() -> dict[str, Any]:
    data = Fashion()
    with tempfile.TemporaryDirectory(dir=ROOT / "cache", prefix="bench-fanout-") as tmp:
        work = Path(tmp)
        zip_path = data.zip(work / "fashion.zip", data.take(IMAGES))
        shard = max(500, IMAGES // 8)  # a few shards a worker: the last ones balance the load
        server = S3Server()
        server.start()
        try:
            single = one_train(work / "single", server, zip_path, 1, 10 * IMAGES)
            one = one_train(work / "one", server, zip_path, 1, shard)
            two = one_train(work / "two", server, zip_path, 2, shard)
        finally:
            server.stop()
    return {
        "images": IMAGES,
        "shard_images": shard,
        "single": single,
        "one": one,
        "two": two,
        "speedup": round(one["seconds"] / two["seconds"], 2),
        "embed_speedup": round(two["embed_rate"] / one["embed_rate"], 2),
        "speedup_vs_single": round(single["seconds"] / two["seconds"], 2),
        "overhead": round(one["seconds"] / single["seconds"] - 1, 3),
    }


def markdown(r: dict[str, Any]) -> str:
    rows = [
        ("one job on one worker process (no shards)", r["single"]),
        (f"sharded on one worker process ({r['one']['shards']} shards)", r["one"]),
        (f"sharded on two worker processes ({r['two']['shards']} shards)", r["two"]),
    ]
    table = "\n".join(
        f"| {name} | {row['seconds']} | {row['rate']} | {row.get('embed_rate', '')} | "
        f"{row['cpu_busy']:.0%} | {row['store_share']:.0%} |"
        for name, row in rows
    )
    return f"""## Trains over the worker tier

{r["images"]:,} Fashion-MNIST images, `fine_tune=never`, zip in -> version published, through the
worker path on moto's S3 and SQS (POST /train, the zip to S3, the job to SQS, the SQS daemon's
stand-in posting to the Procfile's gunicorn with the worker profile, one encoder thread per worker
process); shards of {r["shard_images"]:,} images.

| run | seconds | images/s | images/s while the shards ran | machine CPU busy | of it, the S3/SQS stand-in |
|---|---|---|---|---|---|
{table}

- Two worker processes against one, both sharded: **{r["speedup"]}x** end to end (target >= 1.7x),
  {r["embed_speedup"]}x while the shards ran; against the single-instance path: {r["speedup_vs_single"]}x.
  On this machine the S3 and SQS stand-in (moto, in the benchmark's own process) and the two
  workers share two cores: the CPU columns say how busy they were (docs/CAPACITY.md).
- Sharded against the single-instance path on one process: **{r["overhead"] * 100:+.1f}%**
  (target <= 10%).
- Killed-worker, poison-shard, duplicate-delivery and concurrent-reducer runs are tests
  (tests/system/test_fanout.py): zero lost images, zero duplicate items, one reducer.
"""
