"""A change costs what it changes, measured at the sizes users have, side by side in one run:

- PATCH, DELETE and an add of 10 images (until searchable) at 5,000 and 40,000 real Fashion-MNIST
  items and on a 1,000,000-item synthetic base, with the bytes each writes into the store;
- S3 requests and seconds per PATCH and per DELETE on moto's server at 2,000 and 20,000 items, and
  the bytes the serving instance downloads after each change;
- the store held by ten versions that differ by one change each, against one version's;
- search over 16 uncompacted small segments beside the base, against the compacted version;
- a compaction of the 40,000-item catalog run as a job while 8 clients query through the
  Procfile's gunicorn (failed queries, answers from a version that was never current).
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

from bench import demo
from service import create_app
from service.core.config import ROOT
from service.serving.search import search, segment_search
from tests.helpers import S3Server, procfile_server, seed_cache

# BENCH_SIZE_SCALE=0.01 runs every part at a hundredth of the sizes (a check that the bench works).
SCALE = float(os.environ.get("BENCH_SIZE_SCALE", "1"))
SIZES = (int(5_000 * SCALE), int(40_000 * SCALE))
S3_SIZES = (int(2_000 * SCALE), int(20_000 * SCALE))
SYNTHETIC = (int(5_000 * SCALE), int(1_000_000 * SCALE))  # the same endpoint set-up at both sizes
ADDED = 10


# --- data ---------------------------------------------------------------------------------------


class Fashion:
    """Fashion-MNIST images as PNG members of zips: `take(n)` hands out images never used before."""

    def __init__(self) -> None:
        train, train_labels = demo.load_fashion_mnist("train")
        test, test_labels = demo.load_fashion_mnist("t10k")
        self.images = np.concatenate([train, test])
        self.labels = np.concatenate([train_labels, test_labels])
        self.order = np.random.default_rng(11).permutation(len(self.images))
        self.used = 0

    def take(self, n: int) -> list[int]:
        picked = self.order[self.used : self.used + n]
        self.used += n
        return [int(i) for i in picked]

    def zip(self, path: Path, picks: list[int], prefix: str = "") -> Path:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for i in picks:
                zf.writestr(f"{prefix}{demo.FASHION_CLASSES[self.labels[i]]}/{i:05d}.png", self.png(i))
        return path

    def png(self, i: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(self.images[i]).save(out, format="PNG")
        return out.getvalue()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


# --- one catalog, changed ----------------------------------------------------------------------------


class Catalog:
    """An app (the service in this process) on its own store, trained on `n` Fashion-MNIST items."""

    def __init__(self, work: Path, data: Fashion, n: int, **settings: Any) -> None:
        self.work, self.data = work, data
        config = {
            "storage_uri": str(work / "store"),
            "cache_dir": seed_cache(work / "cache"),
            "warm_on_start": False,
            "train_in_child": False,
            "keep_versions": 20,
            "encode_batch_size": 64,
            **settings,
        }
        self.app = create_app(config)
        data.used = 0  # each catalog its own store: images need only be new to it
        self.client = self.app.test_client()
        self.service = self.app.extensions["simsvc"]
        if n:
            started = time.perf_counter()
            self.service.train_now(
                "fashion", data.zip(work / "base.zip", data.take(n)), "never", lambda p: None
            )
            self.train_s = time.perf_counter() - started
        self.query = data.png(data.take(1)[0])

    def ask(self) -> dict[str, Any]:
        answer = self.client.post("/fashion/infer?k=10", data=self.query, content_type="image/png")
        assert answer.status_code == 200, answer.get_json()
        return answer.get_json()

    def some_ids(self, n: int) -> list[int]:
        view = self.service.endpoint("fashion").current().view
        ids: list[int] = []
        for segment in view.segments:
            live = segment.live()
            ids.extend(int(i) for i in np.asarray(segment.items)[live[: n - len(ids)]])
            if len(ids) >= n:
                break
        return ids

    def patch(self, item: int) -> float:
        started = time.perf_counter()
        answer = self.client.patch(f"/fashion/items/{item}", json={"metadata": {"price": item % 97}})
        assert answer.status_code == 200, answer.get_json()
        return time.perf_counter() - started

    def delete(self, item: int) -> float:
        started = time.perf_counter()
        answer = self.client.delete(f"/fashion/items/{item}")
        assert answer.status_code == 200, answer.get_json()
        return time.perf_counter() - started

    def add(self, n: int = ADDED) -> float:
        """Seconds from the POST to the first answer from the version that holds the new images."""
        path = self.data.zip(self.work / f"add-{time.monotonic_ns()}.zip", self.data.take(n), "new-")
        started = time.perf_counter()
        with path.open("rb") as f:
            answer = self.client.post("/fashion/items", data={"file": (f, "add.zip")})
        assert answer.status_code == 202, answer.get_json()
        url = answer.get_json()["status_url"]
        while (job := self.client.get(url).get_json())["status"] not in ("succeeded", "failed"):
            time.sleep(0.01)
        assert job["status"] == "succeeded", job
        while self.ask()["version"] != job["version"]:
            time.sleep(0.01)
        return time.perf_counter() - started

    def store_growth(self, change: Callable[[], float]) -> tuple[float, int]:
        before = folder_bytes(self.work / "store")
        seconds = change()
        return seconds, folder_bytes(self.work / "store") - before

    def close(self) -> None:
        self.service.close()


def median(values: list[float]) -> float:
    return float(np.median(values))


def changes_at(catalog: Catalog, rounds: int = 5) -> dict[str, Any]:
    """Median seconds and bytes written of each change, the first of each kind left out (warm-up)."""
    catalog.ask()
    ids = catalog.some_ids(2 * rounds + 2)
    row: dict[str, Any] = {}
    for kind, change in (
        ("patch", lambda i: catalog.patch(ids[i])),
        ("delete", lambda i: catalog.delete(ids[rounds + 1 + i])),
        ("add", lambda i: catalog.add()),
    ):
        measured = [catalog.store_growth(lambda i=i, change=change: change(i)) for i in range(rounds + 1)][1:]
        row[f"{kind}_s"] = round(median([s for s, _ in measured]), 3)
        row[f"{kind}_bytes"] = int(median([b for _, b in measured]))
        print(f"  {kind}: {row[f'{kind}_s']} s, {row[f'{kind}_bytes']:,} bytes", flush=True)
    return row


# --- the synthetic base ----------------------------------------------------------------------------


def synthetic_base(work: Path, data: Fashion, rows: int) -> Catalog:
    """A catalog of `rows` items whose vectors are synthetic (clustered, unit length), published as
    one segment beside the converted encoder of a real train of the same endpoint: changes to it
    run the service's own code at that size."""
    from service.catalog.rows import Catalog as Rows
    from service.storage import versions
    from service.training.stage import Stager

    # The fashion endpoint with a head and no thumbnail input: a 1M-row segment of its 256-d vectors
    # is 1 GB (1280-d backbone vectors would be 5 GB, thumbnails another 1.5 GB).
    endpoints = work / "endpoints"
    endpoints.mkdir(parents=True)
    toml = (
        (ROOT / "endpoints" / "fashion.toml")
        .read_text()
        .replace("feature_dim = 256", "feature_dim = 256\nthumbnail = 0")
    )
    (endpoints / "fashion.toml").write_text(toml)
    catalog = Catalog(work, data, 0, endpoints_dir=endpoints)
    catalog.service.train_now(
        "fashion", data.zip(work / "base.zip", data.take(500)), "always", lambda p: None
    )
    current = catalog.service.endpoint("fashion").current()
    manifest, dim = current.manifest, current.manifest.dim
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, 1000, rows)] + 0.5 * rng.normal(size=(rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    shas = [f"{i:064x}" for i in range(rows)]
    made = Rows(
        items=np.arange(rows, dtype=np.int64),
        names=[f"synthetic/{i:07d}.png" for i in range(rows)],
        entries=[
            {"label": f"c{i % 10}", "metadata": {}, "image": f"images/{s}.png", "sha256": s}
            for i, s in enumerate(shas)
        ],
        vectors=vectors,
        backbone=vectors,
        thumbs=np.zeros((rows, 0), np.float32),
        mirrored=None,
        next_id=rows,
    )
    print(f"  writing a {rows:,}-row segment (index, maps)...", flush=True)
    stager = Stager(work / "synthetic")
    segment = stager.segment(made, manifest.n_trees, head=False)
    store = catalog.service.storage
    pointer = versions.read_current(store, "fashion")
    synthetic = manifest.with_changes(
        version=versions.new_version_id(), segments=(segment,), count=rows, rows=rows,
        next_id=rows, labels={f"c{c}": rows // 10 for c in range(10)}, base=manifest.version,
    )  # fmt: skip
    versions.reserve_ids(store, "fashion", 0, rows)
    versions.publish(
        store, synthetic, stager.files, {r.sha256 for r in manifest.blobs()}, base=pointer, change=True
    )
    versions.note_published(catalog.service.settings.cache_dir, "fashion", synthetic.version)
    return catalog


# --- S3 --------------------------------------------------------------------------------------------------


@contextmanager
def counting(storage: Any) -> Iterator[list[str]]:
    """Every S3 request the store's client sends while the block runs."""
    sent: list[str] = []

    def count(**kwargs: Any) -> None:
        sent.append(kwargs.get("event_name", "?"))

    storage.client.meta.events.register("before-send.s3", count)
    try:
        yield sent
    finally:
        storage.client.meta.events.unregister("before-send.s3", count)


def s3_changes(work: Path, data: Fashion, server: S3Server, n: int) -> dict[str, Any]:
    catalog = Catalog(work, data, n, storage_uri=f"s3://{server.bucket()}/simsvc", s3_endpoint_url=server.url)
    catalog.ask()
    ids = catalog.some_ids(8)
    store = catalog.service.storage
    row: dict[str, Any] = {"items": n}
    for kind, run in (("patch", catalog.patch), ("delete", catalog.delete)):
        requests_, seconds, downloaded = [], [], []
        for item in ids[:4] if kind == "patch" else ids[4:8]:
            cached = folder_bytes(work / "cache" / "blobs")
            with counting(store) as sent:
                seconds.append(run(item))
                requests_.append(len(sent))
            catalog.ask()  # served: the instance fetched what the change made
            downloaded.append(folder_bytes(work / "cache" / "blobs") - cached)
        row[f"{kind}_requests"] = max(requests_[1:])
        row[f"{kind}_s"] = round(median(seconds[1:]), 3)
        row[f"{kind}_downloaded"] = max(downloaded[1:])
    # The first add on an instance also reads the base segments' digest files once (40 bytes a row:
    # the vector cache's keys); they never change, so later adds fetch only their own segment.
    for key in ("add_downloaded_first", "add_downloaded"):
        cached = folder_bytes(work / "cache" / "blobs")
        catalog.add()
        row[key] = folder_bytes(work / "cache" / "blobs") - cached
    print(f"  S3 at {n:,}: {row}", flush=True)
    catalog.close()
    return row


# --- segments, retained versions, compaction under load ------------------------------------------------


def segmented_search(catalog: Catalog, data: Fashion, queries: int = 500) -> dict[str, Any]:
    """recall@10 (against an exact scan of the live vectors) and search time per query with 16 small
    uncompacted segments beside the base, then after compacting them. Both views stay open and each
    query is timed on both in turn (five rounds), so drift in the machine's speed hits both alike."""
    compact_all(catalog)  # the base: one segment
    for _ in range(16):
        catalog.add()
    current = catalog.service.endpoint("fashion").current()
    pictures = [
        np.asarray(Image.fromarray(data.images[i]).convert("RGB").resize((160, 160)))
        for i in data.take(queries)
    ]
    vectors = current.encoder.encode(np.stack(pictures))
    out: dict[str, Any] = {}
    views = {"16 small segments": current.view}
    recall = {"16 small segments": recall_at_10(current.view, vectors)}  # read before compaction evicts
    compact_all(catalog)
    views["compacted"] = catalog.service.endpoint("fashion").current().view
    recall["compacted"] = recall_at_10(views["compacted"], vectors)
    # The base segment of the uncompacted view searched alone: what the 16 small segments add on
    # top of it, apart from the difference between two Annoy builds (the base and the compacted).
    base = next(s for s in views["16 small segments"].segments if s.index is not None)
    searches = {label: (lambda v, view=view: search(view, v, 10)) for label, view in views.items()}
    searches["the base segment alone"] = lambda v: segment_search(base, v, 10, None)
    times: dict[str, list[float]] = {label: [] for label in searches}
    for _ in range(5):
        for v in vectors:
            for label, run in searches.items():
                started = time.perf_counter()
                run(v)
                times[label].append(time.perf_counter() - started)
    for label in searches:
        out[label] = {"p50_ms": round(median(times[label]) * 1000, 3)}
        if label in views:
            out[label].update(segments=len(views[label].segments), recall=recall[label])
        print(f"  {label}: {out[label]}", flush=True)
    return out


def recall_at_10(view: Any, vectors: np.ndarray) -> float:
    live = [(i, int(r)) for i, s in enumerate(view.segments) for r in s.live()]
    matrix = np.stack([np.asarray(view.segments[i].vectors[r]) for i, r in live])
    recall = []
    for v in vectors:
        truth = {live[j] for j in np.argsort(-(matrix @ v))[:10]}
        recall.append(len(truth & {(h.segment, h.row) for h in search(view, v, 10)}) / 10)
    return round(float(np.mean(recall)), 4)


def compact_all(catalog: Catalog) -> None:
    """Merge every segment into one (the policy aside), and serve the result."""
    from service.training import compaction

    service = catalog.service
    done = compaction.compact(service.specs["fashion"], service.storage, service.settings, every_segment=True)
    while catalog.ask()["version"] != done.version:
        time.sleep(0.05)


def retained_store(work: Path, data: Fashion, n: int) -> dict[str, Any]:
    """The store held by one version, then by ten that differ by one change each."""
    catalog = Catalog(work, data, n, keep_versions=10)
    one = folder_bytes(work / "store")
    ids = catalog.some_ids(9)
    for i, item in enumerate(ids):
        (catalog.patch if i % 2 else catalog.delete)(item)
    versions_kept = len(catalog.client.get("/fashion/versions").get_json()["versions"])
    ten = folder_bytes(work / "store")
    catalog.close()
    return {
        "items": n,
        "one_version": one,
        "versions": versions_kept,
        "ten_versions": ten,
        "ratio": round(ten / one, 3),
    }


def compaction_under_load(work: Path, data: Fashion, n: int, clients: int = 8) -> dict[str, Any]:
    """A 40,000-item catalog with a quarter of it deleted, compacted by a job while clients query
    through the Procfile's gunicorn: every answer must succeed and come from a version that was
    current (the one before the compaction, or the compaction's)."""
    catalog = Catalog(work, data, n, compact_deleted_share=0.9)  # no compaction before the server's
    doomed = catalog.some_ids(n // 4)
    catalog.client.delete("/fashion/items", json={"ids": doomed})
    catalog.close()
    query = data.png(data.take(1)[0])
    failures, seen = [], set()
    stop = threading.Event()
    env = {"CACHE_DIR": str(work / "cache"), "STORAGE_URI": str(work / "store"), "WATCH_INTERVAL_S": "0.5"}
    with procfile_server(work, env) as server:
        before = requests.post(f"{server.url}/fashion/infer", data=query, timeout=30,
                               headers={"Content-Type": "image/png"}).json()["version"]  # fmt: skip

        def client() -> None:
            session = requests.Session()
            while not stop.is_set():
                try:
                    answer = session.post(f"{server.url}/fashion/infer?k=10", data=query,
                                          headers={"Content-Type": "image/png"}, timeout=30)  # fmt: skip
                    if answer.status_code != 200:
                        failures.append(answer.status_code)
                    else:
                        seen.add(answer.json()["version"])
                except requests.RequestException as exc:
                    failures.append(repr(exc))

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        time.sleep(2)
        started = time.perf_counter()
        answer = requests.post(f"{server.url}/fashion/compact", timeout=30)
        assert answer.status_code == 202, answer.text
        job = answer.json()
        while (state := requests.get(job["status_url"], timeout=30).json())["status"] not in (
            "succeeded",
            "failed",
        ):
            time.sleep(0.2)
        compacted_s = time.perf_counter() - started
        time.sleep(3)
        stop.set()
        for thread in threads:
            thread.join()
        # After the compaction: an add would have queued one itself (the deletions make it due).
        searchable = {size: add_until_searchable(server.url, data, work, size) for size in (1, ADDED)}
    wrong = seen - {before, state.get("version")}
    result = {
        "items": n,
        "deleted": len(doomed),
        "job": state["status"],
        "compaction_s": round(compacted_s, 1),
        "failed_queries": len(failures),
        "wrong_versions": len(wrong),
        "versions_seen": len(seen),
        "add_searchable_s": searchable,
    }
    print(f"  compaction under load: {result}", flush=True)
    return result


def add_until_searchable(url: str, data: Fashion, work: Path, size: int, rounds: int = 3) -> float:
    """Median seconds from `POST /fashion/items` (`size` new images) to the first answer to a query
    with one of them that finds it, through the server at `url`."""
    seconds = []
    for _ in range(rounds):
        picks = data.take(size)
        path = data.zip(work / f"searchable-{time.monotonic_ns()}.zip", picks, "new-")
        probe, name = (
            data.png(picks[0]),
            f"new-{demo.FASHION_CLASSES[data.labels[picks[0]]]}/{picks[0]:05d}.png",
        )
        started = time.perf_counter()
        with path.open("rb") as f:
            answer = requests.post(f"{url}/fashion/items", files={"file": ("add.zip", f)}, timeout=30)
        assert answer.status_code == 202, answer.text
        while True:
            answer = requests.post(f"{url}/fashion/infer?k=5", data=probe, timeout=30,
                                   headers={"Content-Type": "image/png"})  # fmt: skip
            if name in {hit["name"] for hit in answer.json()["results"]}:
                break
            time.sleep(0.02)
        seconds.append(time.perf_counter() - started)
    print(f"  an add of {size} searchable through gunicorn after {median(seconds):.2f} s", flush=True)
    return round(median(seconds), 2)


def run() -> dict[str, Any]:
    data = Fashion()
    result: dict[str, Any] = {"sizes": {}, "s3": []}
    with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
        work = Path(tmp)
        for n in SIZES:
            print(f"- {n:,} items", flush=True)
            # Compaction left to this bench's own calls (here, changes must not be merged away).
            catalog = Catalog(work / f"local-{n}", data, n, compact_max_segments=1000)
            result["sizes"][n] = {"train_s": round(catalog.train_s, 1), **changes_at(catalog)}
            if n == max(SIZES):
                result["segments"] = segmented_search(catalog, data)
            catalog.close()
        result["synthetic"] = {}
        for n in SYNTHETIC:
            print(f"- {n:,} synthetic items", flush=True)
            synthetic = synthetic_base(work / f"synthetic-{n}", data, n)
            result["synthetic"][n] = changes_at(synthetic, rounds=3)
            synthetic.close()
        server = S3Server()
        server.start()
        try:
            for n in S3_SIZES:
                result["s3"].append(s3_changes(work / f"s3-{n}", data, server, n))
        finally:
            server.stop()
        result["retained"] = retained_store(work / "retained", data, max(SIZES))
        result["compaction"] = compaction_under_load(work / "compaction", data, max(SIZES))
    return result


def markdown(r: dict[str, Any]) -> str:
    small, large = (r["sizes"][n] for n in SIZES)
    tiny, huge = (r["synthetic"][n] for n in SYNTHETIC)
    lines = [
        "## A change costs what it changes",
        "",
        "Fashion-MNIST items on the local store (`fine_tune=never`), the service in this process; each "
        "figure is the median of 5 changes after a first one (3 on the synthetic bases). The add is "
        "timed from the POST to the first answer from the version that holds the new images. The "
        "synthetic bases (5,000 and 1,000,000 items) hold synthetic 256-d vectors in one indexed "
        "segment beside a real train's converted encoder and fine-tuned head (so an add goes "
        "through the head), without thumbnails: a 1M-row segment of the real endpoint's 1,280-d "
        "vectors would need 5 GB of disk.",
        "",
        "| change | 5,000 items | 40,000 items | ×40k/5k | synthetic 5,000 | synthetic 1,000,000 "
        "| ×1M/5k | bytes written at 40k / 1M |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, what in (
        ("patch", "`PATCH` one item"),
        ("delete", "`DELETE` one item"),
        ("add", f"add {ADDED} images"),
    ):
        a, b, c, d = small[f"{kind}_s"], large[f"{kind}_s"], tiny[f"{kind}_s"], huge[f"{kind}_s"]
        lines.append(
            f"| {what} | {a} s | {b} s | {b / a:.2f} | {c} s | {d} s | {d / c:.2f} | "
            f"{large[f'{kind}_bytes']:,} / {huge[f'{kind}_bytes']:,} |"
        )
    lines += [
        "",
        "On S3 (moto's server, real HTTP on loopback): requests the change sent, its seconds, and the "
        "bytes the serving instance downloaded to serve the version it made. The first add on an "
        "instance also reads the base segments' digest files once (the vector cache's keys, 40 "
        "bytes a row, never rewritten): shown apart.",
        "",
        "| items | PATCH requests | PATCH s | DELETE requests | DELETE s "
        "| downloaded: PATCH / DELETE / add 10 | the first add 10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["s3"]:
        lines.append(
            f"| {row['items']:,} | {row['patch_requests']} | {row['patch_s']} | {row['delete_requests']} | "
            f"{row['delete_s']} | {row['patch_downloaded']:,} / {row['delete_downloaded']:,} / "
            f"{row['add_downloaded']:,} | {row['add_downloaded_first']:,} |"
        )
    ret, seg, comp = r["retained"], r["segments"], r["compaction"]
    few, one = seg["16 small segments"], seg["compacted"]
    lines += [
        "",
        f"- **Ten retained versions** of the {ret['items']:,}-item catalog, each one change from the "
        f"last ({ret['versions']} listed): {ret['ten_versions']:,} bytes against {ret['one_version']:,} "
        f"for one version: **×{ret['ratio']}**.",
        f"- **Uncompacted segments**: with {few['segments'] - 1} small segments beside the base, "
        f"recall@10 {few['recall']} (compacted: {one['recall']}, {one['segments']} segment(s)); search "
        f"p50 {few['p50_ms']} ms against {one['p50_ms']} ms (vector search only, the encoder aside; "
        f"the uncompacted view's base segment alone: {seg['the base segment alone']['p50_ms']} ms, so the "
        f"small segments add {few['p50_ms'] - seg['the base segment alone']['p50_ms']:.3f} ms and the "
        "rest is the difference between two Annoy builds).",
        f"- **Compaction under load**: {comp['items']:,} items ({comp['deleted']:,} deleted) compacted "
        f"in {comp['compaction_s']} s by a job while 8 clients queried through the Procfile's gunicorn: "
        f"{comp['failed_queries']} failed queries, {comp['wrong_versions']} answers from a version that "
        f"was not current ({comp['versions_seen']} versions seen; the job {comp['job']}).",
        f"- **An add searchable**, end to end through the Procfile's gunicorn on the same catalog: "
        f"{comp['add_searchable_s'][1]} s for 1 image, {comp['add_searchable_s'][ADDED]} s for "
        f"{ADDED} (median of 3, from the POST to the first query that finds the new image).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(run()))
