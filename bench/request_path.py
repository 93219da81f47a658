"""The request path at the encoder's limit: a query's cost beside LiteRT on the same converted model.

A fine-tuned 10,000-image Fashion-MNIST version (the product's usual shape: a labelled catalogue,
its head kept) served by the Procfile's gunicorn (2 workers), side by side in one run: with its
head fused into the converted model (FUSE_HEAD=1, the default: one invoke per query) and with the
head in NumPy after the backbone's invoke (FUSE_HEAD=0, the path before). For each: p50 of
single requests, requests/s with 8 and 32 clients, and one worker's CPU-ms per request split by
part (bench/overhead.py). The reference is LiteRT on the endpoint's converted backbone, the same
file the service runs (batch-1 forward on all cores, best images/s over batch sizes); the fused
model's own forward is shown beside it. The two paths' answers are compared score by score.
Beside them, the fused path without this service's two cuts (the keep-alive linger; a lone pass
on every core) and through other servers: gunicorn's sync worker and a uvicorn worker.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import demo, overhead, perf, quality
from service.catalog.head import FUSED_FILE, HeadEncoder
from service.core.config import ROOT, Settings
from service.core.endpoint import parse_endpoint
from service.serving.query import ranked
from service.serving.registry import load_version
from service.storage import versions
from service.storage.blobs import BlobCache
from service.storage.local import LocalStorage
from service.training import train as training

INDEXED = 10_000
PATHS = ((True, "fused head (one invoke)"), (False, "head in NumPy (one BLAS thread, as served now)"))
COMPARED = 300  # test images whose answers are compared between the two paths


def run() -> dict[str, Any]:
    settings = Settings.load({"warm_on_start": False})
    spec = parse_endpoint(ROOT / "endpoints" / "fashion.toml")
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
        work = Path(tmp)
        store = LocalStorage(work / "store")
        local = replace(settings, cache_dir=work / "cache", fuse_head=True)
        zip_path = perf.fashion_zip(work / "fashion.zip", INDEXED)
        started = time.perf_counter()
        trained = training.train(spec, zip_path, store, local, fine_tune="always")
        result["train_s"] = round(time.perf_counter() - started, 1)
        manifest = versions.read_manifest(store, "fashion", trained.version)
        assert manifest.head is not None and FUSED_FILE in manifest.head.files, manifest.runtime
        result["fused"] = dict(manifest.runtime["head"])
        cache = BlobCache(store, local.cache_dir)
        assert manifest.encoder_model is not None
        backbone_file = cache.path("fashion", manifest.encoder_model, "encoder.tflite")
        fused_file = cache.path("fashion", manifest.head.files[FUSED_FILE], FUSED_FILE)
        size = int(manifest.encoder["input_size"])
        result["raw"] = perf.raw_litert(backbone_file, size)
        result["raw_fused"] = perf.raw_litert(fused_file, size)
        print(f"  raw: {result['raw']}\n  raw fused: {result['raw_fused']}", flush=True)
        result["answers"] = same_answers(store, spec, trained.version, local)
        print(f"  answers: {result['answers']}", flush=True)
        result["paths"] = [serve(store.root, work, fuse, name=name) for fuse, name in PATHS]
        # The threaded worker handing every kept-alive connection back to its main loop between
        # requests, as gunicorn does (server/worker.py's linger off): what the linger saves
        no_linger = {"GUNICORN_KEEPALIVE_LINGER_MS": "0"}
        result["paths"].append(
            serve(store.root, work, True, no_linger, name="fused head, no keep-alive linger (gunicorn's own)")
        )
        # Every pass on its worker's share of the cores, even alone on the machine (core/inflight.py off)
        shared = {"LONE_PASS_ALL_CORES": "0"}
        result["paths"].append(
            serve(store.root, work, True, shared, name="fused head, a lone pass on one core too")
        )
        # gunicorn's sync worker (behind nginx on Elastic Beanstalk it would not meet slow clients;
        # without it, it fails the slow-client tests): what the threaded worker's machinery costs
        sync = {"GUNICORN_CMD_ARGS": "--worker-class sync", "GUNICORN_THREADS": "1"}
        result["paths"].append(serve(store.root, work, True, sync, name="fused head, gunicorn's sync worker"))
        # A worker class on a compiled HTTP parser: uvicorn-worker (httptools), the Flask app through
        # uvicorn's WSGI bridge (a thread pool). Measured only: the service's slow-client guard, its
        # balanced accept and its 408s live in the threaded worker (requirements-dev.txt installs it).
        uvicorn = {"GUNICORN_CMD_ARGS": "--worker-class bench.uvicorn_wsgi.WsgiUvicornWorker"}
        result["paths"].append(
            serve(store.root, work, True, uvicorn, name="fused head, uvicorn worker (httptools)")
        )
    return result


def same_answers(store: LocalStorage, spec: Any, version: str, settings: Settings) -> dict[str, Any]:
    """Top-10 ids and scores of COMPARED test images through the fused model and the NumPy head."""
    loaded = load_version(store, spec, version, settings, BlobCache(store, settings.cache_dir))
    assert isinstance(loaded.encoder, HeadEncoder) and loaded.encoder.fused is not None
    numpy_head = HeadEncoder(loaded.encoder.backbone, loaded.encoder.head)
    test_x, _ = demo.load_fashion_mnist("t10k")
    inputs = quality.encoder_inputs(test_x[:COMPARED], loaded.encoder.input_size)
    worst, differ = 0.0, 0
    for fused_vector, plain_vector in zip(
        loaded.encoder.encode(inputs), numpy_head.encode(inputs), strict=True
    ):
        a = ranked(loaded.view, fused_vector, 10, loaded.query)
        b = ranked(loaded.view, plain_vector, 10, loaded.query)
        differ += [h.row for h in a] != [h.row for h in b]
        worst = max(worst, max(abs(x.score - y.score) for x, y in zip(a, b, strict=True)))
    return {"queries": COMPARED, "max_score_difference": float(f"{worst:.2e}"), "orders_differ": int(differ)}


def serve(
    store: Path, work: Path, fuse: bool, extra: dict[str, str] | None = None, name: str = ""
) -> dict[str, Any]:
    """The Procfile's gunicorn on `store` with FUSE_HEAD on or off: latency, load, CPU split."""
    env = {"FUSE_HEAD": "1" if fuse else "0", **(extra or {})}
    body = work / "query.png"
    body.write_bytes(overhead.query_body())
    body.with_suffix(".lua").write_text(perf.WRK_SCRIPT)
    row: dict[str, Any] = {"path": name}
    folder = work / f"caches-{len(list(work.glob('caches-*')))}"  # fresh caches per path
    folder.mkdir()
    with perf.gunicorn(store, folder / "serve", 2, extra_env=env) as (url, _):
        row["latency"] = perf.latency(url, body.read_bytes(), "image/png")
        row["load"] = [perf.concurrency(url, body, "image/png", c) for c in (8, 32)]
    one = {**env, "TF_INTRA_OP_THREADS": "1", "LONE_PASS_ALL_CORES": "0"}  # one thread per pass
    with perf.gunicorn(store, folder / "split", 1, extra_env=one) as (url, process):
        pid = int(Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()[0])
        row["split"] = overhead.split(url, pid, body, perf.wrk)
    print(f"  {row['path']}: {row}", flush=True)
    return row


def markdown(r: dict[str, Any]) -> str:
    raw, fused = r["raw"], r["raw_fused"]
    best = raw["best_images_per_s"]
    lines = [
        "## The request path at the encoder's limit",
        "",
        f"A fine-tuned {INDEXED:,}-image Fashion-MNIST version (trained in {r['train_s']} s with its "
        f"head fused: {r['fused']}), served by the Procfile's gunicorn. Reference: LiteRT on the same "
        f"converted backbone, **{raw['batch1_ms']} ms** batch-1 forward on all cores, best **{best}** "
        f"images/s (batch {raw['best_batch']}); the fused model (backbone + head) itself: "
        f"{fused['batch1_ms']} ms, best {fused['best_images_per_s']} images/s. Latency: 300 sequential "
        "`POST /fashion/infer?k=10` of a 28x28 PNG on one keep-alive connection (2 workers); load: wrk, "
        "three 8 s runs, the median; split: one worker (one thread per forward pass) under 4 clients, "
        "py-spy. The fused model's invoke is counted as encoder: what it adds over the backbone's is "
        f"{fused['batch1_ms_1_thread'] - raw['batch1_ms_1_thread']:.2f} ms on one thread (its forward "
        f"{fused['batch1_ms_1_thread']} ms against {raw['batch1_ms_1_thread']} ms).",
        "",
        "| path | p50 ms | p50 − raw batch-1 | req/s, 8 clients (× raw best) | req/s, 32 clients "
        "(× raw best) | failed | CPU-ms per request | outside the encoder |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in r["paths"]:
        load = {c["connections"]: c for c in p["load"]}
        split = p["split"]
        outside = split["cpu_ms"] - sum(v for k, v in split["parts_ms"].items() if k.startswith("encoder"))
        rates = [f"{load[c]['requests_per_s']} ({load[c]['requests_per_s'] / best:.2f}×)" for c in (8, 32)]
        lines.append(
            f"| {p['path']} | {p['latency']['p50']} | +{p['latency']['p50'] - raw['batch1_ms']:.2f} ms | "
            f"{rates[0]} | {rates[1]} | {load[8]['failed'] + load[32]['failed']} | {split['cpu_ms']} | "
            f"{outside:.2f} |"
        )
    if "uvicorn_failed" in r:
        lines += ["", f"The uvicorn worker did not serve: {r['uvicorn_failed']}."]
    a = r["answers"]
    lines += [
        "",
        f"Answers: {a['queries']} test images through both paths: the largest difference of a result's "
        f"score {a['max_score_difference']}, {a['orders_differ']} queries ranked differently.",
        "",
        "Where each path's CPU goes (CPU-ms per request):",
        "",
        "| part | " + " | ".join(p["path"] for p in r["paths"]) + " |",
        "|---|" + "---|" * len(r["paths"]),
    ]
    for part in sorted({k for p in r["paths"] for k in p["split"]["parts_ms"]}):
        values = [str(p["split"]["parts_ms"].get(part, 0)) for p in r["paths"]]
        lines.append(f"| {part} | " + " | ".join(values) + " |")
    return "\n".join(lines)
