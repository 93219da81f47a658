"""Reliability: a bounded load test with a new version published midway, and every bad input tried
against the live server (the Procfile's gunicorn command). Writes docs/RELIABILITY.md."""

from __future__ import annotations

import collections
import io
import json
import os
import random
import re
import stat
import subprocess
import tempfile
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

from bench import demo
from bench.perf import fashion_zip, gunicorn
from service.core.config import ROOT, Settings
from service.core.endpoint import parse_endpoint
from service.storage import versions
from service.storage.local import LocalStorage
from service.training import train as training

DOCUMENT = "RELIABILITY.md"
CLIENTS, REQUESTS = 16, 6000
ADMIN = "reliability-admin-token-0123456789"


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def zipped(files: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as zf:
        for name, data in files.items():
            if name.startswith("link:"):
                info = zipfile.ZipInfo(name[5:])
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, data)
            else:
                zf.writestr(name, data)
    return out.getvalue()


def load(url: str, store: LocalStorage, queries: list[bytes], publish: Any) -> dict[str, Any]:
    """CLIENTS threads send REQUESTS requests in all (infer 70%, similar 20%, info 10%); when 40% are
    sent, `publish()` trains and publishes a new version through the API."""
    sent, lock = [0], threading.Lock()
    records: list[dict[str, Any]] = []
    published: dict[str, Any] = {}

    def client(seed: int) -> None:
        rng = random.Random(seed)
        session = requests.Session()
        while True:
            with lock:
                if sent[0] >= REQUESTS:
                    return
                sent[0] += 1
                n = sent[0]
            if n == int(REQUESTS * 0.25):
                threading.Thread(target=lambda: published.update(publish()), daemon=True).start()
            kind = rng.choices(["infer", "similar", "info"], [7, 2, 1])[0]
            started = time.perf_counter()
            try:
                if kind == "infer":
                    r = session.post(
                        f"{url}/fashion/infer?k=10",
                        data=rng.choice(queries),
                        headers={"Content-Type": "image/png"},
                        timeout=60,
                    )
                elif kind == "similar":
                    # ids both versions have (v1: 1,000 items, v2: 600 of them)
                    r = session.get(f"{url}/fashion/items/{rng.randrange(600)}/similar?k=10", timeout=60)
                else:
                    r = session.get(f"{url}/fashion", timeout=60)
                body = r.json()
                records.append(
                    {
                        "kind": kind,
                        "message": "" if r.ok else str(body.get("message", ""))[:120],
                        "status": r.status_code,
                        "ms": (time.perf_counter() - started) * 1000,
                        "version": body.get("version"),
                        "results": [(x["id"], x["name"]) for x in body.get("results", [])],
                    }
                )
            except Exception as exc:  # a failed request is a finding, not a crash of the test
                records.append({"kind": kind, "status": None, "ms": None, "error": repr(exc)})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    deadline = time.monotonic() + 300
    while "version" not in published and time.monotonic() < deadline:
        time.sleep(0.5)

    # Every answer must come from one complete version: each (item id, name) pair it returned must
    # be exactly that pair in the version it says it came from (ids.json: row -> name;
    # metadata.json: row -> its item id).
    names: dict[str, Any] = {}
    mismatched = 0
    for r in records:
        version = r.get("version")
        if not version or not r.get("results"):
            continue
        if version not in names:
            prefix = versions.version_prefix("fashion", version)
            by_row = json.loads(store.read(prefix + "ids.json"))
            meta = json.loads(store.read(prefix + "metadata.json"))
            names[version] = {str(meta[row].get("item", row)): name for row, name in by_row.items()}
        mismatched += sum(names[version].get(str(i)) != name for i, name in r["results"])
    ok = [r for r in records if r["status"] == 200]
    latencies = np.array([r["ms"] for r in records if r["ms"] is not None])
    seen: dict[str, int] = {}
    for r in ok:
        seen[r["version"]] = seen.get(r["version"], 0) + 1
    return {
        "requests": len(records),
        "seconds": round(seconds, 1),
        "clients": CLIENTS,
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "failures": dict(
            collections.Counter(
                f"{r['kind']} {r['status']}: {r.get('message') or r.get('error', '')}"
                for r in records
                if r["status"] != 200
            ).most_common(5)
        ),
        "server_errors": sum(1 for r in records if (r["status"] or 0) >= 500),
        "no_answer": sum(1 for r in records if r["status"] is None),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "by_version": seen,
        "published": published,
        "mismatched_results": mismatched,
        "kinds": {k: sum(1 for r in records if r["kind"] == k) for k in ("infer", "similar", "info")},
    }


def _workers_cost(master: subprocess.Popen) -> tuple[float, float]:
    """The gunicorn workers' CPU seconds so far, and the sum of their peak resident memory (MB)."""
    pid = master.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    cpu, peak = 0.0, 0.0
    for child in children:
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            status = Path(f"/proc/{child}/status").read_text()
            peak += int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
        except (OSError, AttributeError):
            continue
    return cpu, peak


def _scan_bomb(repeats: int) -> bytes:
    """A progressive JPEG whose last scan repeats: each repeat is one more decode pass."""
    out = io.BytesIO()
    demo.photo("coffee").resize((160, 120)).save(out, format="JPEG", progressive=True, quality=80)
    data = out.getvalue()
    last_scan = data.rindex(b"\xff\xda")
    return data[:last_scan] + data[last_scan:-2] * repeats + b"\xff\xd9"


def bad_inputs(url: str, store: LocalStorage, master: subprocess.Popen) -> list[dict[str, Any]]:
    """Every kind of bad input we know of, sent to the live server; what it answered, and what it
    cost the workers (CPU seconds, growth of their peak memory), beside a normal query."""
    jpeg = demo.jpeg(demo.photo("coffee").resize((120, 80)))
    tiny = png(Image.new("RGB", (4, 4)))
    auth = {"Authorization": f"Bearer {ADMIN}"}
    image_cases: list[tuple[str, bytes, str]] = [
        ("a normal query (for comparison)", jpeg, "image/jpeg"),
        # The costliest image still accepted: 36 Mpx of RGB, inside every limit (a small file).
        (
            "the largest accepted: a 6000x6000 RGB PNG",
            _save_png(Image.new("RGB", (6000, 6000), (90, 40, 20))),
            "image/png",
        ),
        ("progressive JPEG whose last scan repeats 1,000 times", _scan_bomb(1000), "image/jpeg"),
        (
            "16-bit PNG, 6000x6000 (inside MAX_IMAGE_PIXELS)",
            png(Image.new("I;16", (6000, 6000))),
            "image/png",
        ),
        ("not an image", b"hello, world", "image/png"),
        ("empty body", b"", "image/jpeg"),
        ("truncated JPEG", jpeg[: len(jpeg) // 3], "image/jpeg"),
        ("TIFF (an unsupported format)", _save(demo.photo("coffee"), "TIFF"), "image/tiff"),
        ("decompression bomb: 20000x20000 PNG of 0s", png(Image.new("1", (20000, 20000))), "image/png"),
        ("3 MB body (limit 2 MB)", b"\xff" * 3_000_000, "image/jpeg"),
        ("JSON instead of an image", b'{"image": "x"}', "application/json"),
        ("no content type", jpeg, ""),
        ("CMYK JPEG (odd but valid)", _save(demo.photo("coffee").convert("CMYK"), "JPEG"), "image/jpeg"),
        (
            "16-bit greyscale PNG (odd but valid)",
            png(Image.fromarray(np.full((40, 40), 40000, np.uint16))),
            "image/png",
        ),
        ("palette PNG with transparency (odd but valid)", png(demo.photo("moon").convert("P")), "image/png"),
    ]
    palette = Image.new("P", (5000, 5000))
    image_cases.insert(
        3, ("palette PNG with transparency, 5000x5000", _save_png(palette, transparency=0), "image/png")
    )
    current = versions.read_current(store, "fashion").version  # before the jobs below publish
    many = [("image", (f"{i}.png", tiny, "image/png")) for i in range(999)]
    chunks = (piece for piece in [jpeg] + [b"\0" * 1_000_000] * 3)  # no Content-Length: chunked
    cases: list[tuple[str, str, str, dict[str, Any]]] = [
        ("999 tiny PNG parts in one infer", "POST", "/fashion/infer", {"files": many}),
        ("40 tiny PNG parts in one infer", "POST", "/fashion/infer", {"files": many[:40]}),
        (
            "chunked body over the limit (3 MB, limit 2 MB)",
            "POST",
            "/fashion/infer",
            {"data": chunks, "headers": {"Content-Type": "image/jpeg"}},
        ),
        (
            "JSON nested 50,000 deep to /rollback",
            "POST",
            "/fashion/rollback",
            {"data": "[" * 50_000 + "]" * 50_000, "headers": {**auth, "Content-Type": "application/json"}},
        ),
        ("a Host header not trusted", "GET", "/health", {"headers": {"Host": "evil.example"}}),
        ("delete the current version", "DELETE", f"/fashion/versions/{current}", {"headers": auth}),
        (
            "roll back to a version that does not exist",
            "POST",
            "/fashion/rollback",
            {"json": {"version": "20200101T000000.000000Z-abcdef"}, "headers": auth},
        ),
    ]
    cases += [
        (name, "POST", "/fashion/infer", {"data": body, "headers": {"Content-Type": ctype} if ctype else {}})
        for name, body, ctype in image_cases
    ]
    zips = {
        "zip bomb (50 MB of zeros, deflated)": zipped(
            {"a/bomb.jpg": b"\0" * 50_000_000}, zipfile.ZIP_DEFLATED
        ),
        "path traversal and absolute paths": zipped(
            {"../../evil.jpg": jpeg, "/etc/abs.jpg": jpeg, "a/ok.jpg": jpeg}
        ),
        "symlink entry": zipped({"link:a/passwd.jpg": "/etc/passwd", "a/ok.jpg": jpeg}),
        "nested zip": zipped({"a/inner.zip": zipped({"x.jpg": jpeg}), "a/ok.jpg": jpeg}),
        "zip of text files only": zipped({"a/readme.txt": b"no images"}),
        "300 BMPs of 999,000 bytes (each under the per-entry floor)": zipped(
            {f"a/{i}.bmp": b"\0" * 999_000 for i in range(300)}, zipfile.ZIP_DEFLATED
        ),
        "metadata.jsonl with NaN": zipped(
            {"a/x.jpg": jpeg, "metadata.jsonl": b'{"filename": "a/x.jpg", "price": NaN}\n'}
        ),
        "not a zip": b"PK\x03\x04 but not really",
        "zip needing format 9.9": _future_zip(jpeg),
    }
    cases += [
        (
            f"train: {name}",
            "POST",
            "/fashion/train",
            {"files": {"file": ("x.zip", body)}, "data": {"fine_tune": "never"}, "headers": auth},
        )
        for name, body in zips.items()
    ]
    cases += [
        (
            "train without a token",
            "POST",
            "/fashion/train",
            {"files": {"file": ("x.zip", zips["not a zip"])}},
        ),
        (
            "train with a wrong token",
            "POST",
            "/fashion/train",
            {
                "files": {"file": ("x.zip", zips["not a zip"])},
                "headers": {"Authorization": "Bearer " + "x" * 30},
            },
        ),
        (
            "train from another bucket",
            "POST",
            "/fashion/train",
            {"json": {"source": "s3://someone-else/x.zip"}, "headers": auth},
        ),
        (
            "train with fine_tune=sometimes",
            "POST",
            "/fashion/train",
            {
                "files": {"file": ("x.zip", zips["nested zip"])},
                "data": {"fine_tune": "sometimes"},
                "headers": auth,
            },
        ),
        ("k=0", "POST", "/fashion/infer?k=0", {"data": jpeg, "headers": {"Content-Type": "image/jpeg"}}),
        (
            "k=100000",
            "POST",
            "/fashion/infer?k=100000",
            {"data": jpeg, "headers": {"Content-Type": "image/jpeg"}},
        ),
        ("k=ten", "GET", "/fashion/items/0/similar?k=ten", {}),
        (
            "unknown endpoint",
            "POST",
            "/shoes/infer",
            {"data": jpeg, "headers": {"Content-Type": "image/jpeg"}},
        ),
        ("unknown item", "GET", "/fashion/items/999999/similar", {}),
        ("negative item", "GET", "/fashion/items/-1/image", {}),
        ("unknown job", "GET", "/fashion/jobs/0123456789abcdef", {}),
        ("job id with a path in it", "GET", "/fashion/jobs/..%2F..%2Fetc", {}),
        ("image of a version that does not exist", "GET", "/fashion/items/0/image?version=..%2F..%2Fx", {}),
        ("worker route on a web instance", "POST", "/worker/jobs", {"json": {"job_id": "0" * 16}}),
        ("an unknown route", "GET", "/no/such/route/at/all", {}),
        ("PUT on /health", "PUT", "/health", {}),
    ]
    rows = []
    for name, method, path, kwargs in cases:
        cpu_before, peak_before = _workers_cost(master)
        response = requests.request(method, url + path, timeout=120, **kwargs)
        cpu_after, peak_after = _workers_cost(master)
        try:
            message = _summary(url, response) if response.ok else response.json().get("message", "")
        except ValueError:
            message = f"(not JSON: {response.headers.get('Content-Type')})"
        rows.append(
            {
                "input": name,
                "request": f"{method} {path.split('?')[0]}",
                "status": response.status_code,
                "answer": message,
                "cpu_s": round(cpu_after - cpu_before, 2),
                "peak_mb": round(peak_after - peak_before),
            }
        )
    return rows


def _save_png(image: Image.Image, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **params)
    return out.getvalue()


def _summary(url: str, response: requests.Response) -> str:
    body = response.json()
    if "results" in body:
        return f"{len(body['results'])} results from version {body['version']}"
    if "job_id" in body:  # follow the job: what it made of the zip
        while (job := requests.get(body["status_url"], timeout=30).json())["status"] not in (
            "succeeded",
            "failed",
        ):
            time.sleep(0.3)
        skipped = "; ".join(f"{s['name']}: {s['reason']}" for s in job["skipped"]) or "none"
        outcome = (
            f"{job['counts'].get('images', 0)} images indexed"
            if job["status"] == "succeeded"
            else job["error"]
        )
        return f"job {job['status']}: {outcome}; skipped: {skipped}"
    return "ok"


def _save(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _future_zip(jpeg: bytes) -> bytes:
    data = bytearray(zipped({"a/x.jpg": jpeg}))
    data[data.index(b"PK\x01\x02") + 6] = 99
    return bytes(data)


def run() -> dict[str, Any]:
    settings = Settings.load({"warm_on_start": False})
    spec = parse_endpoint(ROOT / "endpoints" / "fashion.toml")
    test_images, _ = demo.load_fashion_mnist("t10k")
    queries = [png(Image.fromarray(test_images[i])) for i in range(0, 400, 4)]
    with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
        work = Path(tmp)
        store = LocalStorage(work / "store")
        first = training.train(
            spec,
            fashion_zip(work / "v1.zip", 1000),
            store,
            replace(settings, cache_dir=work / "c"),
            fine_tune="never",
        )
        # The second version: 600 of the first one's items (their names, so their ids stay) with
        # other images, so `similar` on ids 0..599 is valid in both versions and 600 images are
        # embedded while the load runs.
        prefix = versions.version_prefix("fashion", first.version)
        by_row = json.loads(store.read(prefix + "ids.json"))
        meta = json.loads(store.read(prefix + "metadata.json"))
        kept_names = [name for row, name in by_row.items() if meta[row]["item"] < 600]
        second_zip = zipped(
            {name: png(Image.fromarray(test_images[1000 + i])) for i, name in enumerate(kept_names)}
        )
        env = {"ADMIN_TOKEN": ADMIN, "MAX_IMAGE_MB": "2", "MAX_IMAGE_PIXELS": "40000000"}
        with gunicorn(work / "store", work / "cache", workers=2, extra_env=env) as (address, master):
            url = f"http://{address}"

            def publish() -> dict[str, Any]:
                response = requests.post(
                    f"{url}/fashion/train",
                    files={"file": ("v2.zip", second_zip)},
                    data={"fine_tune": "never"},
                    headers={"Authorization": f"Bearer {ADMIN}"},
                    timeout=120,
                )
                status_url = response.json()["status_url"]
                while (job := requests.get(status_url, timeout=30).json())["status"] not in (
                    "succeeded",
                    "failed",
                ):
                    time.sleep(0.5)
                return job

            result = load(url, store, queries, publish)
            print(f"  load: {result}", flush=True)
            result["bad_inputs"] = bad_inputs(url, store, master)
            result["first_version"] = first.version
    return result


def markdown(r: dict[str, Any]) -> str:
    published = r["published"]
    lines = [
        "# Reliability",
        "",
        "Written by `make bench` (bench/reliability.py) against the Procfile's gunicorn command "
        "(2 workers) on this 2-core machine.",
        "",
        "## Sustained load with a publish midway",
        "",
        f"{r['clients']} concurrent clients sent {r['requests']:,} requests in {r['seconds']} s "
        f"(infer {r['kinds']['infer']}, similar {r['kinds']['similar']}, endpoint info {r['kinds']['info']}) "
        "to the `fashion` endpoint (1,000 Fashion-MNIST images). When 25% had been sent, a training job "
        f"for a new version (600 images) was posted through the API; it "
        f"{published.get('status', 'did not finish')} as version {published.get('version')} while the "
        "load went on.",
        "",
        "| requests | 2xx | failed | 5xx | no answer | p50 ms | p99 ms | answers that mixed versions |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['requests']:,} | {r['ok']:,} | {r['failed']} | {r['server_errors']} | {r['no_answer']} | "
        f"{r['p50_ms']} | {r['p99_ms']} | {r['mismatched_results']} |",
        "",
        ("Answers that were not 2xx: " + "; ".join(f"{k} ({n})" for k, n in r["failures"].items()) + ". ")
        if r["failures"]
        else "",
        "Answers by version: " + ", ".join(f"`{v}`: {n:,}" for v, n in r["by_version"].items()) + ". Every "
        "result's (id, name) pair was checked against the ids.json of the version the answer named: an "
        "answer built from two versions, or from a half-published one, would show up in the last column.",
        "",
        "## Bad input, and what the service answered",
        "",
        "What each cost the two workers: CPU seconds, and how much their peak resident memory grew "
        "(0: within what they had already used). Before this release, the worst of these cost: 999 "
        "tiny parts 28 s and ~7 GB that stayed resident; the scan bomb ~14 CPU s; the 16-bit PNG "
        "~726 MB; the palette PNG ~650 MB; the 300 BMPs wrote 300 MB.",
        "",
        "| input | request | status | answer | CPU s | peak memory +MB |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["bad_inputs"]:
        answer = row["answer"].replace("|", "\\|")[:300]
        lines.append(
            f"| {row['input']} | `{row['request']}` | {row['status']} | {answer} | "
            f"{row.get('cpu_s', '')} | {row.get('peak_mb', '')} |"
        )
    lines += [
        "",
        "Hostile zips that the service accepts (traversal, symlinks, nested archives, files that are not "
        "images) train on their usable images; every skipped file is listed with its reason in the job's "
        "`skipped`. The test suite covers each of these and more (tests/api/test_hostile.py, "
        "tests/api/test_auth.py, tests/system/test_faults.py, tests/catalog/test_fuzz.py, "
        "tests/api/test_schemathesis.py).",
    ]
    return "\n".join(lines)
