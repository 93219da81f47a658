"""Speed and memory: training throughput, latency and throughput through gunicorn, the Annoy index
(recall, speed, size), memory per worker with a 1M-vector index, and growth with size.

Every figure is paired with a reference measured in the same run: the raw encoder's forward pass
(batch 1 and the best batch size), exact numpy search, the raw vectors' size.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from annoy import AnnoyIndex
from PIL import Image

from bench import demo
from service import encoders
from service.catalog.head import thumbnails
from service.catalog.index import auto_search_k, build_index
from service.core.config import ROOT, Settings
from service.core.endpoint import parse_endpoint
from service.storage import versions
from service.storage.local import LocalStorage
from service.training import train as training
from service.training.results import Progress

DIM = 256  # the endpoints' feature_dim: what a fine-tuned version indexes
BATCH_SIZES = (1, 8, 16, 32, 64, 128)


def timed(fn: Any, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


# --- the raw encoder --------------------------------------------------------------------------


def raw_encoder(encoder: encoders.Encoder) -> dict[str, Any]:
    """TensorFlow: forward-pass time at batch 1, and images/s at each batch size (median of passes)."""
    size = encoder.input_size
    rng = np.random.default_rng(0)
    throughput = {}
    for batch in BATCH_SIZES:
        x = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        encoder.raw(x)  # warm
        repeat = max(5, 256 // batch)
        throughput[batch] = round(batch / float(np.median(timed(lambda x=x: encoder.raw(x), repeat))), 1)
    one = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    single = timed(lambda: encoder.raw(one), 100)
    best = max(throughput, key=throughput.get)
    return {
        "runtime": "TensorFlow (SavedModel)",
        "batch1_ms": round(float(np.median(single)) * 1000, 2),
        "throughput": throughput,
        "best_batch": best,
        "best_images_per_s": throughput[best],
    }


def raw_litert(model: Path, size: int) -> dict[str, Any]:
    """LiteRT with XNNPACK, the same model converted: batch 1 on all cores and on one (what each
    of two workers gets), and images/s at real batch sizes 1 to 64 (an interpreter per size)."""
    from ai_edge_litert.interpreter import Interpreter

    rng = np.random.default_rng(0)

    def interpreter(batch: int, threads: int) -> Any:
        it = Interpreter(model_path=str(model), num_threads=threads)
        index = it.get_input_details()[0]["index"]
        it.resize_tensor_input(index, [batch, size, size, 3])
        it.allocate_tensors()
        x = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)

        def run() -> None:
            it.set_tensor(index, x)
            it.invoke()

        run()  # warm
        return run

    cores = os.cpu_count() or 1
    throughput = {}
    for batch in (1, 8, 16, 32, 64):
        run = interpreter(batch, cores)
        throughput[batch] = round(batch / float(np.median(timed(run, max(5, 512 // batch)))), 1)
    best = max(throughput, key=throughput.get)
    return {
        "runtime": "LiteRT (converted, XNNPACK)",
        "batch1_ms": round(float(np.median(timed(interpreter(1, cores), 300))) * 1000, 3),
        "batch1_ms_1_thread": round(float(np.median(timed(interpreter(1, 1), 300))) * 1000, 3),
        "throughput": throughput,
        "best_batch": best,
        "best_images_per_s": throughput[best],
    }


def strided_thumbnails(batch: np.ndarray, side: int) -> np.ndarray:
    """The thumbnails as the service computed them before: a mean over strided blocks (the reference)."""
    n, size = batch.shape[0], batch.shape[1]
    step = size // side
    small = (batch.astype(np.float32) / 255.0).reshape(n, side, step, side, step, 3).mean(axis=(2, 4))
    return small.reshape(n, -1).astype(np.float32)


def thumbnail_cost(size: int, side: int = 16) -> list[dict[str, Any]]:
    """ms per image of a head's thumbnail input, before and now, at a training batch and one query
    (on inputs of the largest size that `side` divides, the only ones the strided mean took)."""
    size -= size % side
    rng = np.random.default_rng(0)
    rows = []
    for batch in (64, 1):
        x = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        repeat = max(20, 640 // batch)
        row: dict[str, Any] = {"batch": batch, "size": size}
        for name, fn in (("strided mean", strided_thumbnails), ("matrix products", thumbnails)):
            fn(x, side)  # warm
            row[name] = round(
                float(np.median(timed(lambda fn=fn, x=x: fn(x, side), repeat))) / batch * 1000, 3
            )
        row["max difference"] = float(np.abs(thumbnails(x, side) - strided_thumbnails(x, side)).max())
        rows.append(row)
    return rows


# --- training ---------------------------------------------------------------------------------


def fashion_zip(path: Path, count: int) -> Path:
    images, labels = demo.load_fashion_mnist("train")
    pick = np.random.default_rng(1).choice(len(images), count, replace=False)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for n in pick:
            out = io.BytesIO()
            Image.fromarray(images[n]).save(out, format="PNG")
            zf.writestr(f"{demo.FASHION_CLASSES[labels[n]]}/{n:05d}.png", out.getvalue())
    return path


def training_throughput(
    work: Path, settings: Settings, sizes: tuple[int, ...], runs: int = 3
) -> list[dict[str, Any]]:
    """Zip in -> version published, `runs` times per size (this machine is noisy): the median run,
    and every run's images/s."""
    spec = parse_endpoint(ROOT / "endpoints" / "fashion.toml")
    rows = []
    for count in sizes:
        zip_path = fashion_zip(work / f"fashion-{count}.zip", count)
        measured = []
        for run in range(runs):
            # A fresh store each run: in one store a second train of the same images would reuse
            # the first one's vectors (and measure no embedding). The serving section serves the
            # last one, kept in work/store.
            last = count == sizes[-1] and run == runs - 1
            store = LocalStorage(work / ("store" if last else f"store-{count}-{run}"))
            marks: list[tuple[str, float]] = []  # (stage, when it began): where a training second goes

            def mark(progress: Progress, marks: list[tuple[str, float]] = marks) -> None:
                if not marks or marks[-1][0] != progress.stage:
                    marks.append((progress.stage, time.perf_counter()))

            started = time.perf_counter()
            result = training.train(spec, zip_path, store, settings, on_progress=mark, fine_tune="never")
            seconds = time.perf_counter() - started
            marks.append(("end", started + seconds))
            stages: dict[str, float] = {}
            for (stage, began), (_, ended) in zip(marks, marks[1:], strict=False):
                stages[stage] = stages.get(stage, 0.0) + ended - began
            index_bytes = sum(ref.size for ref in index_refs(store, result.version))
            measured.append(
                {
                    "images": count,
                    "seconds": round(seconds, 2),
                    "images_per_s": round(count / seconds, 1),
                    "index_mb": round(index_bytes / 2**20, 1),
                    "version": result.version,
                    "stages": {stage: round(s, 2) for stage, s in stages.items()},
                }
            )
            if not last:
                shutil.rmtree(work / f"store-{count}-{run}")
        measured.sort(key=lambda r: r["seconds"])
        rows.append({**measured[len(measured) // 2], "runs": [r["images_per_s"] for r in measured]})
        print(f"  train {count}: {rows[-1]}", flush=True)
    return rows


# --- serving through gunicorn -------------------------------------------------------------------


@contextlib.contextmanager
def gunicorn(
    store: Path, cache: Path, workers: int, threads: int = 16, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """The Procfile's web command on a free port, serving `store`."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = next(x for x in (ROOT / "Procfile").read_text().splitlines() if x.startswith("web:"))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "WEB_CONCURRENCY": str(workers),
        "GUNICORN_THREADS": str(threads),
        "STORAGE_URI": f"file://{store}",
        "CACHE_DIR": str(cache),
        "LOG_LEVEL": "WARNING",
    }
    env.pop("TF_INTRA_OP_THREADS", None)
    env.update(extra_env or {})
    process = subprocess.Popen(
        shlex.split(line[4:]), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:  # ready when every worker serves the fashion endpoint
            try:
                status = get_json(url, "/fashion")
                if status.get("status") == "ready":
                    seen = {get_json(url, "/health")["worker"] for _ in range(20 * workers)}
                    if len(seen) >= workers and all(
                        get_json(url, "/health")["endpoints"]["fashion"] for _ in range(10)
                    ):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("gunicorn did not become ready")
            time.sleep(0.5)
        yield url, process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def get_json(url: str, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection(url, timeout=30)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def latency(url: str, body: bytes, content_type: str, requests: int = 300) -> dict[str, float]:
    """Sequential requests on one keep-alive connection: p50/p95/p99 in ms (after 20 warm-ups)."""
    conn = http.client.HTTPConnection(url, timeout=30)
    times = []
    for n in range(requests + 20):
        started = time.perf_counter()
        conn.request("POST", "/fashion/infer?k=10", body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"infer answered {response.status}")
        if n >= 20:
            times.append(time.perf_counter() - started)
    conn.close()
    ms = np.array(times) * 1000
    return {f"p{q}": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)}


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("BODY_TYPE")
local f = io.open(os.getenv("BODY_FILE"), "rb")
wrk.body = f:read("*all")
f:close()
"""


def wrk(url: str, script: Path, env: dict[str, str], connections: int, seconds: int) -> dict[str, Any]:
    """One wrk run (a C load generator, one thread) on fresh keep-alive connections."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            f"http://{url}/fashion/infer?k=10",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    failures = sum(int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|errors: .*?): (\d+)", out))
    p99 = re.search(r"99%\s+([\d.]+)(\w+)", out)
    p99_ms = float(p99.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[p99.group(2)] if p99 else None
    return {"connections": connections, "requests_per_s": rps, "failed": failures, "p99_ms": p99_ms}


def concurrency(
    url: str, body_file: Path, content_type: str, connections: int, seconds: int = 8, runs: int = 3
) -> dict[str, Any]:
    """Requests/s with `connections` concurrent clients: a 3 s warm-up (the encoder meets new batch
    sizes), then `runs` runs, each on fresh connections; the median run, and every run's figure."""
    script = body_file.with_suffix(".lua")
    script.write_text(WRK_SCRIPT)
    env = {**os.environ, "BODY_FILE": str(body_file), "BODY_TYPE": content_type}
    wrk(url, script, env, connections, 3)
    results = sorted(
        (wrk(url, script, env, connections, seconds) for _ in range(runs)), key=lambda r: r["requests_per_s"]
    )
    median = results[len(results) // 2]
    return {
        **median,
        "failed": sum(r["failed"] for r in results),
        "runs": [r["requests_per_s"] for r in results],
    }


def serving(store: Path, work: Path, raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Latency and throughput for 1 worker x 2 TF threads and 2 workers x 1 TF thread."""
    test_images, _ = demo.load_fashion_mnist("t10k")
    png = io.BytesIO()
    Image.fromarray(test_images[0]).save(png, format="PNG")
    bodies = {
        "28x28 PNG (Fashion-MNIST)": (png.getvalue(), "image/png"),
        "600x400 JPEG photo": (demo.jpeg(demo.photo("coffee")), "image/jpeg"),
    }
    body_file = work / "query.png"
    body_file.write_bytes(png.getvalue())
    rows = []
    for workers in (1, 2):
        with gunicorn(store, work / f"cache-{workers}", workers) as (url, process):
            row: dict[str, Any] = {"workers": workers, "tf_threads": max(1, (os.cpu_count() or 1) // workers)}
            row["runtime"] = get_json(url, "/fashion")["runtime"]["name"]
            for name, (body, ctype) in bodies.items():
                row[f"latency {name}"] = latency(url, body, ctype)
            row["load"] = [concurrency(url, body_file, "image/png", c) for c in (8, 32)]
            rows.append(row)
            print(f"  serving: {row}", flush=True)
    return rows


# --- the index ----------------------------------------------------------------------------------


def clustered(n: int, dim: int, seed: int, clusters: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around `clusters` random centres (like embeddings of many kinds of product)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    data = centres[rng.integers(0, clusters, n)] + rng.normal(scale=0.9, size=(n, dim)).astype(np.float32)
    queries = centres[rng.integers(0, clusters, 200)] + rng.normal(scale=0.9, size=(200, dim)).astype(
        np.float32
    )
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    return norm(data), norm(queries)


def timed_search(search: Any, queries: np.ndarray, passes: int = 3) -> tuple[list[Any], float]:
    """Each query's answer, and milliseconds per query: the median of `passes` timed passes over
    all queries after the untimed one that gave the answers (the first touch of an mmapped index
    pays page faults, not search)."""
    answers = [search(q) for q in queries]
    times = []
    for _ in range(passes):
        started = time.perf_counter()
        for q in queries:
            search(q)
        times.append((time.perf_counter() - started) / len(queries) * 1000)
    return answers, float(np.median(times))


def index_bench(n: int, work: Path, trees: tuple[int, ...], search_ks: tuple[int, ...]) -> dict[str, Any]:
    search_ks = tuple(sorted({*search_ks, auto_search_k(n)}))  # always measure the default
    data, queries = clustered(n, DIM, seed=n)
    exact, exact_ms = timed_search(lambda q: np.argpartition(-(data @ q), 10)[:10], queries)
    truth = [set(top) for top in exact]
    raw_bytes = data.nbytes
    configs = []
    for n_trees in trees:
        path = work / f"index-{n}-{n_trees}.ann"
        started = time.perf_counter()
        build_index(data, n_trees, path)
        build_s = time.perf_counter() - started
        index = AnnoyIndex(DIM, "angular")
        index.load(str(path))
        for search_k in search_ks:
            found, ms = timed_search(
                lambda q, ix=index, k=search_k: ix.get_nns_by_vector(q, 10, search_k=k), queries
            )
            recall = float(np.mean([len(set(f) & t) / 10 for f, t in zip(found, truth, strict=True)]))
            configs.append(
                {
                    "n_trees": n_trees,
                    "search_k": search_k,
                    "auto": search_k == auto_search_k(n),
                    "recall@10": round(recall, 3),
                    "query_ms": round(ms, 3),
                    "speedup": round(exact_ms / ms, 1),
                    "size_ratio": round(path.stat().st_size / raw_bytes, 2),
                    "build_s": round(build_s, 1),
                }
            )
            print(f"  index {n}: {configs[-1]}", flush=True)
        index.unload()
    return {
        "n": n,
        "exact_ms": round(exact_ms, 2),
        "raw_mb": round(raw_bytes / 2**20, 1),
        "configs": configs,
        "data": data,
    }


# --- memory with a 1M-vector version ----------------------------------------------------------


def index_refs(storage: LocalStorage, version: str | None = None) -> list[Any]:
    """The index files (BlobRefs: sha256, size) of a fashion version's segments (the current one by
    default). A segment under 2,000 rows has none: it is searched exactly."""
    version = version or versions.read_current(storage, "fashion").version
    manifest = versions.read_manifest(storage, "fashion", version)
    return [s.files["index"] for s in manifest.segments if "index" in s.files]


def index_blobs(store: Path) -> set[str]:
    """The sha256 of each index file of the current version (the store names its blobs by it)."""
    return {ref.sha256 for ref in index_refs(LocalStorage(store))}


def worker_memory(process: subprocess.Popen, indexes: set[str]) -> list[dict[str, float]]:
    """Each worker's memory; `index_resident_mb`: the resident pages of its mappings of `indexes`."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    rows = []
    for pid in children:
        fields = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) / 1024  # MB
        index_mapped, in_index = 0.0, False
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header: address range ... path
                in_index = any(sha in line for sha in indexes)
            elif in_index and line.startswith("Rss:"):
                index_mapped += int(line.split()[1]) / 1024
        rows.append(
            {
                "pid": int(pid),
                "rss_mb": round(fields["Rss"], 1),
                "pss_mb": round(fields["Pss"], 1),
                "anonymous_mb": round(fields["Anonymous"], 1),
                "shared_mb": round(fields["Shared_Clean"] + fields["Shared_Dirty"], 1),
                "index_resident_mb": round(index_mapped, 1),
            }
        )
    return rows


def memory_bench(work: Path, small_store: Path, rows: int) -> dict[str, Any]:
    """Two Procfile workers' memory serving a `rows`-item synthetic version (bench/size.py's
    synthetic base: one segment of clustered 256-d vectors beside a real train's head and
    converted encoder), and the 10k-image version."""
    from bench.size import Fashion, synthetic_base

    base = work / "synthetic"
    synthetic_base(base, Fashion(), rows).close()
    query = demo.jpeg(demo.photo("coffee"))
    result = {}
    targets = (
        ("1M vectors", base / "store", {"ENDPOINTS_DIR": str(base / "endpoints")}),
        ("10k images", small_store, {}),
    )
    for name, where, env in targets:
        with gunicorn(where, work / f"cache-mem-{len(result)}", workers=2, extra_env=env) as (url, process):
            for _ in range(200):  # touch the index in both workers
                conn = http.client.HTTPConnection(url, timeout=30)
                conn.request(
                    "POST", "/fashion/infer?k=10", body=query, headers={"Content-Type": "image/jpeg"}
                )
                conn.getresponse().read()
                conn.close()
            result[name] = worker_memory(process, index_blobs(where))
            print(f"  memory {name}: {result[name]}", flush=True)
    index_bytes = sum(ref.size for ref in index_refs(LocalStorage(base / "store")))
    return {"workers": result, "index_mb": round(index_bytes / 2**20, 1)}


# --- everything ---------------------------------------------------------------------------------


def worker_boot(store: Path, work: Path) -> dict[str, Any]:
    """A worker killed under the Procfile's gunicorn: seconds from the new worker's fork to its
    first answer that serves the version (GET /health from that worker, endpoint loaded)."""
    with gunicorn(store, work / "cache-boot", workers=2) as (url, process):
        version = get_json(url, "/fashion")["version"]
        rows = []
        for _ in range(3):
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
            old = set(children.read_text().split())
            os.kill(int(sorted(old)[0]), signal.SIGKILL)
            deadline = time.monotonic() + 60
            while not (new := set(children.read_text().split()) - old):
                if time.monotonic() > deadline:
                    raise RuntimeError("gunicorn started no new worker")
                time.sleep(0.005)
            born = time.monotonic()
            pid = int(new.pop())
            while True:
                try:
                    body = get_json(url, "/health")
                    if body["worker"] == pid and body["endpoints"].get("fashion") == version:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the new worker never served the version")
                time.sleep(0.005)
            rows.append(round(time.monotonic() - born, 2))
        memory = worker_memory(process, index_blobs(store))
    return {"seconds": rows, "memory": memory}


def overhead_split(store: Path, work: Path) -> dict[str, Any]:
    """Where a request's CPU time goes in one gunicorn worker (bench/overhead.py)."""
    from bench import overhead

    body = work / "overhead.png"
    body.write_bytes(overhead.query_body())
    body.with_suffix(".lua").write_text(WRK_SCRIPT)
    one_thread = {"TF_INTRA_OP_THREADS": "1", "LONE_PASS_ALL_CORES": "0"}
    with gunicorn(store, work / "cache-overhead", 1, extra_env=one_thread) as (
        url,
        process,
    ):
        pid = int(Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()[0])
        return overhead.split(url, pid, body, wrk)


def run() -> dict[str, Any]:
    from service.encoders import convert

    settings = Settings.load({"warm_on_start": False})
    encoder = encoders.load(encoders.offline_source(settings.models_dir), settings.hub_cache)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
        work = Path(tmp)
        tf_raw = raw_encoder(encoder)
        lite_raw = raw_litert(convert.converted_file(encoder, work / "cache"), encoder.input_size)
        result["raw_all"] = [tf_raw, lite_raw]
        # The reference is the fastest runtime: its best batch-1 time and its best throughput.
        result["raw"] = raw = max(result["raw_all"], key=lambda r: r["best_images_per_s"])
        print(f"  raw encoder: {result['raw_all']}", flush=True)
        local = replace(settings, cache_dir=work / "cache", encode_batch_size=64)
        result["thumbnails"] = thumbnail_cost(encoder.input_size)
        print(f"  thumbnails: {result['thumbnails']}", flush=True)
        result["training"] = training_throughput(work, local, (1_000, 10_000))
        result["serving"] = serving(work / "store", work, raw)
        result["overhead"] = overhead_split(work / "store", work)
        print(f"  overhead: {result['overhead']}", flush=True)
        result["boot"] = worker_boot(work / "store", work)
        print(f"  worker boot: {result['boot']}", flush=True)
        result["index_100k"] = index_bench(100_000, work, (16, 32), (1_000, 3_000, 10_000))
        big = index_bench(1_000_000, work, (32,), (3_000, 6_000, 10_000, 20_000))
        big.pop("data")  # 1 GB: gone before the memory section builds its own 1M-row version
        result["memory"] = memory_bench(work, work / "store", big["n"])
        result["index_100k"].pop("data")
        result["index_1m"] = big
        result["growth"] = growth(result, work)
    return result


def growth(result: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    """Train time and index size at 1k, 10k (measured end to end) and 100k (index measured on
    synthetic vectors, embedding projected from the 10k run's rate)."""
    rows = [
        {"images": r["images"], "train_s": r["seconds"], "index_mb": r["index_mb"], "how": "measured"}
        for r in result["training"]
    ]
    data, _ = clustered(100_000, 1280, seed=7)  # frozen-encoder width, like the measured runs
    started = time.perf_counter()
    build_index(data, 32, work / "growth.ann")
    build_s = time.perf_counter() - started
    rate = result["training"][-1]["images_per_s"]
    rows.append(
        {
            "images": 100_000,
            "train_s": round(100_000 / rate + build_s, 1),
            "index_mb": round((work / "growth.ann").stat().st_size / 2**20, 1),
            "how": f"index built ({build_s:.1f}s) on synthetic 1280-d vectors; embedding at the 10k rate",
        }
    )
    return rows


def markdown(r: dict[str, Any]) -> str:
    raw = r["raw"]
    best = raw["best_images_per_s"]
    lines = [
        "## Speed",
        "",
        "### The reference: the raw encoder (offline MobileNetV2, 160x160, all cores)",
        "",
        "The same model in both runtimes, measured one after the other in this run; the service is "
        f"compared with the faster, **{raw['runtime']}**. Each version's encoder is converted to "
        "TFLite when it is built and served by LiteRT (service/encoders/convert.py, litert.py).",
        "",
        "| runtime | batch 1, all cores (ms) | batch 1, 1 thread (ms) | images/s by batch size | best |",
        "|---|---|---|---|---|",
    ]
    for row in r["raw_all"]:
        lines.append(
            f"| {row['runtime']} | {row['batch1_ms']} | {row.get('batch1_ms_1_thread', '')} | "
            + ", ".join(f"{b}: {v}" for b, v in row["throughput"].items())
            + f" | **{row['best_images_per_s']}** (batch {row['best_batch']}) |"
        )
    lines += [
        "",
        "### Training throughput (zip in → version published, fine_tune=never)",
        "",
        "Three runs per size; the table gives the median run and every run's images/s. Index MB 0: the "
        "catalogue is one segment under 2,000 rows, searched exactly (no index is built).",
        "",
        "| images | seconds | images/s | × raw best | index MB | runs (images/s) | seconds by stage |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["training"]:
        lines.append(
            f"| {row['images']:,} | {row['seconds']} | {row['images_per_s']} | "
            f"**{row['images_per_s'] / best:.2f}** | {row['index_mb']} | "
            f"{', '.join(str(x) for x in row['runs'])} | "
            + ", ".join(f"{stage} {s}" for stage, s in row.get("stages", {}).items())
            + " |"
        )
    lines += [
        "",
        "Stages as the job's progress reports them (`embed` includes decoding, the forward passes and "
        "each image's 16x16 thumbnail, which every version keeps for a head a later change may train).",
        "",
        "A head's 16x16 thumbnail input (ms per image, one process): the service computes it with two "
        "small matrix products per channel; before, a mean over strided blocks.",
        "",
        "| batch | input px | strided mean (before) | matrix products (now) | max difference |",
        "|---|---|---|---|---|",
    ]
    for row in r.get("thumbnails", []):
        lines.append(
            f"| {row['batch']} | {row['size']} | {row['strided mean']} | **{row['matrix products']}** | "
            f"{row['max difference']:.1e} |"
        )
    lines += [
        "",
        "### Serving through the Procfile's gunicorn command",
        "",
        "Latency: 300 sequential `POST /fashion/infer?k=10` on one keep-alive connection. Load: wrk "
        "(one thread) posting a 28x28 PNG: 3 s of warm-up, then three 8 s runs, each on fresh "
        "connections; the table gives the median run and all three.",
        "",
        "| workers × threads | image | p50 ms | p95 ms | p99 ms | p50 − raw batch-1 forward |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["serving"]:
        for key, value in row.items():
            if key.startswith("latency "):
                lines.append(
                    f"| {row['workers']} × {row['tf_threads']} | {key[8:]} | {value['p50']} | "
                    f"{value['p95']} | {value['p99']} | **{value['p50'] - raw['batch1_ms']:+.1f} ms** |"
                )
    lines += [
        "",
        "| workers × threads | clients | requests/s | × raw best | failed | p99 ms | runs (requests/s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["serving"]:
        for load in row["load"]:
            lines.append(
                f"| {row['workers']} × {row['tf_threads']} | {load['connections']} | "
                f"{load['requests_per_s']:.0f} | **{load['requests_per_s'] / best:.2f}** | "
                f"{load['failed']} | {load['p99_ms']} | {', '.join(f'{x:.0f}' for x in load['runs'])} |"
            )
    ov = r["overhead"]
    outside = ov["cpu_ms"] - sum(v for k, v in ov["parts_ms"].items() if k.startswith("encoder"))
    lines += [
        "",
        "### Where a request's CPU time goes",
        "",
        f"One worker (one thread per forward pass) under wrk with 4 clients: {ov['requests_per_s']:.0f} "
        f"requests/s, **{ov['cpu_ms']} CPU-ms per request** in the worker (from /proc), of which "
        f"**{outside:.2f} ms outside the encoder**. Split by where py-spy found the worker running "
        f"({ov['samples']:,} samples, 200/s; bench/overhead.py):",
        "",
        "| part | CPU-ms per request | share |",
        "|---|---|---|",
    ]
    for name, ms in ov["parts_ms"].items():
        lines.append(f"| {name} | {ms} | {ms / ov['cpu_ms']:.0%} |")
    boot = r["boot"]
    lines += [
        "",
        "### A web worker's start and memory (10,000-image version, LiteRT, no TensorFlow)",
        "",
        "A worker of the Procfile's gunicorn (2 workers) killed three times: seconds from the new "
        "worker's fork to its first answer serving the version: "
        + ", ".join(f"**{x}**" for x in boot["seconds"])
        + " (target ≤ 2 s). Each worker's memory after that (anonymous = private to the process; "
        "target ≤ 150 MB):",
        "",
        "| worker | RSS MB | PSS MB | anonymous (private) MB | shared MB |",
        "|---|---|---|---|---|",
    ]
    for w in boot["memory"]:
        lines.append(
            f"| {w['pid']} | {w['rss_mb']} | {w['pss_mb']} | **{w['anonymous_mb']}** | {w['shared_mb']} |"
        )
    for key in ("index_100k", "index_1m"):
        ix = r[key]
        lines += [
            "",
            f"### Annoy index: {ix['n']:,} clustered synthetic {DIM}-d unit vectors",
            "",
            f"Exact search (numpy, one query at a time): {ix['exact_ms']} ms/query. Raw vectors: "
            f"{ix['raw_mb']} MB. 200 queries, recall@10 against the exact top 10.",
            "",
            "| n_trees | search_k | recall@10 | ms/query | × exact speed | index ÷ raw vectors | build s |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in ix["configs"]:
            search_k = f"{c['search_k']} (auto)" if c["auto"] else c["search_k"]
            lines.append(
                f"| {c['n_trees']} | {search_k} | {c['recall@10']} | {c['query_ms']} | "
                f"{c['speedup']} | {c['size_ratio']} | {c['build_s']} |"
            )
    mem = r["memory"]
    lines += [
        "",
        "### Memory per gunicorn worker",
        "",
        f"Two workers serving a 1M-vector version (index file {mem['index_mb']} MB, mmapped) and, for "
        "comparison, the 10k-image version. Anonymous = memory private to the process; the index "
        "pages are file-backed page cache, shared by the workers.",
        "",
        "| version | worker | RSS MB | PSS MB | anonymous (private) MB | shared MB | index resident MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, workers in mem["workers"].items():
        for w in workers:
            lines.append(
                f"| {name} | {w['pid']} | {w['rss_mb']} | {w['pss_mb']} | {w['anonymous_mb']} | "
                f"{w['shared_mb']} | {w['index_resident_mb']} |"
            )
    lines += ["", "### Growth", "", "| images | train s | index MB | how |", "|---|---|---|---|"]
    for g in r["growth"]:
        lines.append(f"| {g['images']:,} | {g['train_s']} | {g['index_mb']} | {g['how']} |")
    return "\n".join(lines)
