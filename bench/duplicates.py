"""Duplicate detection, measured (issue 22): precision and recall of the pairs found on a planted
set, for the service's vectors (backbone and fine-tuned head) against imagehash's pHash and dHash
on the same images in the same run; then a whole-catalogue report over 100,000 synthetic items
with planted duplicates, its seconds and peak memory.

The planted set: 2,000 catalogue items (Fashion-MNIST training images, upscaled to 112 px as a
shop's product photo would be, and scikit-image's photos), 400 near-duplicates of catalogue items
(each one or more of: resized to 50-90 %, JPEG quality 30-90, cropped by up to 10 %, mirrored,
brightness +-20 %, a small text watermark) and 400 hard negatives (another Fashion-MNIST image of a
catalogue item's class). A found pair is right when both images come from the same catalogue item.
"""

from __future__ import annotations

import io
import json
import pickle
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from bench import demo
from service.catalog import descriptor
from service.catalog.rows import Catalog
from service.catalog.segment import Segment
from service.catalog.view import View
from service.core.config import ROOT, Settings
from service.core.endpoint import parse_endpoint
from service.serving import duplicate_report
from service.serving.registry import load_version
from service.storage.blobs import BlobCache
from service.storage.local import LocalStorage
from service.training import screen
from service.training import train as training
from service.training.stage import Stager

DEFAULT_THRESHOLD = parse_endpoint(ROOT / "endpoints" / "fashion.toml").duplicate_threshold

CATALOGUE, PLANTED, NEGATIVES, SIDE, SEED = 2_000, 400, 400, 224, 0
THRESHOLDS = [round(float(t), 2) for t in np.arange(0.30, 1.0001, 0.01)]
SCALE_ITEMS, SCALE_DIM, SCALE_PLANTED = 100_000, 256, 2_000
SCALE_KINDS, SCALE_KIND_DIMS, SCALE_KIND_WEIGHT = 100, 32, 3.0


def _product(array: np.ndarray) -> Image.Image:
    """A Fashion-MNIST image as a product photo: 28 px upscaled to SIDE (the encoder's input size;
    at 28 px a 10 % crop or a watermark is a different picture)."""
    return Image.fromarray(array).convert("RGB").resize((SIDE, SIDE), Image.Resampling.BICUBIC)


def _watermark(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    marked = image.copy()
    draw = ImageDraw.Draw(marked)
    x, y = int(rng.integers(0, image.width // 2)), int(rng.integers(0, image.height - 12))
    draw.text((x, y), "(c) shop", fill=(255, 255, 255))
    return marked


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB")


def transform(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """One planted near-duplicate: one to three edits of those a shop's copies go through."""
    edits = ["resize", "jpeg", "crop", "mirror", "brightness", "watermark"]
    chosen = rng.choice(edits, size=int(rng.integers(1, 4)), replace=False).tolist()
    w, h = image.size
    for edit in chosen:
        if edit == "resize":
            f = rng.uniform(0.5, 0.9)
            image = image.resize((max(8, int(w * f)), max(8, int(h * f))), Image.Resampling.BILINEAR)
        elif edit == "crop":
            cw, ch = image.width, image.height
            dx, dy = int(cw * rng.uniform(0, 0.1)), int(ch * rng.uniform(0, 0.1))
            ox, oy = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
            image = image.crop((ox, oy, cw - (dx - ox), ch - (dy - oy)))
        elif edit == "mirror":
            image = ImageOps.mirror(image)
        elif edit == "brightness":
            image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
        elif edit == "watermark":
            image = _watermark(image, rng)
    if "jpeg" in chosen:  # last: what a re-upload does to the edited copy
        image = _jpeg(image, int(rng.integers(30, 91)))
    return image, "+".join(chosen)


def planted_set() -> dict[str, Any]:
    """Images, each image's source item (-1: none) and class, and what was done to the copies."""
    rng = np.random.default_rng(SEED)
    train_x, train_y = demo.load_fashion_mnist("train")
    photos = [demo.photo(name) for name in demo.PHOTOS]
    picked = rng.choice(len(train_x), CATALOGUE - len(photos) + NEGATIVES * 3, replace=False)
    catalogue_idx, spare = picked[: CATALOGUE - len(photos)], picked[CATALOGUE - len(photos) :]
    images = [_product(train_x[i]) for i in catalogue_idx] + photos
    classes = [int(train_y[i]) for i in catalogue_idx] + [100 + p for p in range(len(photos))]
    source = list(range(CATALOGUE))
    edits: list[str] = []
    sources = rng.choice(CATALOGUE, PLANTED, replace=False)
    for item in sources:
        copy, how = transform(images[int(item)], rng)
        images.append(copy)
        classes.append(classes[int(item)])
        source.append(int(item))
        edits.append(how)
    negatives = 0
    for i in spare:  # same class as some catalogue item, a different item
        if negatives == NEGATIVES:
            break
        images.append(_product(train_x[i]))
        classes.append(int(train_y[i]))
        source.append(-1 - negatives)  # its own item: nothing in the set duplicates it
        negatives += 1
    return {"images": images, "source": np.array(source), "classes": np.array(classes), "edits": edits}


def truth_pairs(source: np.ndarray) -> set[tuple[int, int]]:
    by_source: dict[int, list[int]] = {}
    for i, s in enumerate(source.tolist()):
        by_source.setdefault(s, []).append(i)
    return {(a, b) for rows in by_source.values() for a in rows for b in rows if a < b}


def curve(similarity: np.ndarray, truth: set[tuple[int, int]]) -> list[dict[str, float]]:
    """Precision and recall of the pairs at or above each threshold (every pair: exact)."""
    upper = np.triu(np.ones_like(similarity, dtype=bool), 1)
    points = []
    for t in THRESHOLDS:
        a, b = np.nonzero((similarity >= t - 1e-9) & upper)
        found = set(zip(a.tolist(), b.tolist(), strict=True))
        right = len(found & truth)
        precision = right / len(found) if found else 1.0
        points.append(
            {"threshold": t, "precision": precision, "recall": right / len(truth), "pairs": len(found)}
        )
    return points


def recall_at_precision(points: list[dict[str, float]], precision: float) -> float:
    return max((p["recall"] for p in points if p["precision"] >= precision), default=0.0)


def _hash_similarity(images: list[Image.Image], kind: str) -> np.ndarray:
    import imagehash

    fn = imagehash.phash if kind == "phash" else imagehash.dhash
    bits = np.array([fn(image).hash.ravel() for image in images], dtype=bool)
    packed = bits.astype(np.float32)
    # Hamming distance from dot products: d = |a| + |b| - 2 a.b; similarity 1 - d / 64
    ones = packed.sum(axis=1)
    distance = ones[:, None] + ones[None, :] - 2 * packed @ packed.T
    return 1.0 - distance / bits.shape[1]


def _zip(images: list[Image.Image], classes: np.ndarray, folder: Path) -> tuple[Path, list[str]]:
    """The planted set as a /train zip (folders = classes); each image's name in it."""
    names = [f"c{int(c)}/{n:05d}.png" for n, c in enumerate(classes)]
    path = folder / "planted.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, image in zip(names, images, strict=True):
            out = io.BytesIO()
            image.save(out, format="PNG")
            zf.writestr(name, out.getvalue())
    return path, names


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _found_pairs(groups: list[dict[str, Any]], index_of: dict[str, int]) -> set[tuple[int, int]]:
    pairs = set()
    for group in groups:
        rows = sorted(index_of[item["name"]] for item in group["items"])
        pairs |= {(a, b) for i, a in enumerate(rows) for b in rows[i + 1 :]}
    return pairs


def quality_part() -> dict[str, Any]:
    """Train the planted set through the service (fine_tune=always: a head, mirrored vectors),
    then every method's precision-recall curve from the version's own stored vectors, and the
    service's report at the default threshold."""
    planted = planted_set()
    images, source, classes = planted["images"], planted["source"], planted["classes"]
    truth = truth_pairs(source)
    settings = Settings.load({"warm_on_start": False})
    spec = parse_endpoint(ROOT / "endpoints" / "fashion.toml")
    with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
        folder = Path(tmp)
        zip_path, names = _zip(images, classes, folder)
        store = LocalStorage(folder / "store")
        local = replace(settings, cache_dir=folder / "cache")
        started = time.perf_counter()
        result = training.train(spec, zip_path, store, local, fine_tune="always")
        train_s = time.perf_counter() - started
        loaded = load_version(store, spec, result.version, local, BlobCache(store, local.cache_dir))
        view, head = loaded.view, loaded.manifest.head is not None
        (segment,) = view.segments
        number = {name: n for n, name in enumerate(names)}
        order = np.array([number[segment.names[r]] for r in range(segment.rows)])
        backbone, _, mirrored = segment.training_inputs(head, np.arange(segment.rows))
        served = np.asarray(segment.vectors, dtype=np.float32)
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        backbone, served = backbone[position], served[position]  # in the planted set's order
        mirrored = None if mirrored is None else mirrored[position]
        whitening = descriptor.of_view(view, head)
        desc = whitening.apply(backbone)
        similarity = {
            "service descriptor (whitened backbone)": desc @ desc.T,
            "backbone (raw cosine)": backbone
            @ backbone.T
            / np.outer(*(np.linalg.norm(backbone, axis=1),) * 2),
            "fine-tuned head (served vectors)": served @ served.T,
            "pHash (imagehash)": _hash_similarity(images, "phash"),
            "dHash (imagehash)": _hash_similarity(images, "dhash"),
        }
        if mirrored is not None:
            flipped = whitening.apply(mirrored)
            both = np.maximum(desc @ desc.T, flipped @ desc.T)
            similarity["service descriptor + mirror images (the report)"] = np.maximum(both, both.T)
        curves = {name: curve(sim, truth) for name, sim in similarity.items()}
        # At the door and in ?duplicates_only, the catalogue's candidates come from the served index
        # (the head's space here): how often is a copy's original among them?
        copies = np.flatnonzero(np.arange(len(source)) >= CATALOGUE)[:PLANTED]
        row_of = {int(order[r]): r for r in range(len(order))}
        found_at = 0
        for c in copies:
            row = row_of[int(c)]
            near = screen.candidates(
                view, np.asarray(segment.vectors[row]), screen.CANDIDATES, int(segment.items[row])
            )
            found_at += row_of[int(source[c])] in {r for _, r in near}
        candidate_recall = found_at / len(copies)
        threshold = spec.duplicate_threshold
        started = time.perf_counter()
        groups = duplicate_report.report(view, head, threshold, folder / "report")
        report_s = time.perf_counter() - started
    found = _found_pairs(groups, {name: n for n, name in enumerate(names)})
    right = len(found & truth)
    return {
        "images": len(images),
        "truth": len(truth),
        "edits": planted["edits"],
        "train_s": round(train_s, 1),
        "curves": curves,
        "threshold": threshold,
        "candidate_recall": candidate_recall,
        "report": {
            "precision": right / len(found) if found else 1.0,
            "recall": right / len(truth),
            "pairs": len(found),
            "groups": len(groups),
            "seconds": round(report_s, 2),
        },
    }


# --- scale: a report over 100,000 synthetic items ------------------------------------------------


def synthetic(folder: Path) -> tuple[Path, np.ndarray]:
    """A staged segment of SCALE_ITEMS unit vectors (SCALE_KINDS kinds of item; every item its kind
    plus its own detail) of which the last SCALE_PLANTED copy an earlier item. Returns where the
    segment's reference is (a pickle a child process opens) and, per planted row, the item it copies."""
    rng = np.random.default_rng(SEED)
    # Kinds of item live in a few directions (what a backbone says about a class); each item
    # adds its own detail in every direction; a copy is its item plus a little noise.
    kinds = np.zeros((SCALE_KINDS, SCALE_DIM), np.float32)
    kinds[:, :SCALE_KIND_DIMS] = rng.standard_normal((SCALE_KINDS, SCALE_KIND_DIMS))
    originals = SCALE_ITEMS - SCALE_PLANTED
    vectors = SCALE_KIND_WEIGHT * kinds[rng.integers(0, SCALE_KINDS, originals)]
    vectors += rng.standard_normal((originals, SCALE_DIM)).astype(np.float32)
    copied = rng.choice(originals, SCALE_PLANTED, replace=False)
    noise = 0.25 * rng.standard_normal((SCALE_PLANTED, SCALE_DIM)).astype(np.float32)
    vectors = np.concatenate([vectors, vectors[copied] + noise])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    digests = [f"{i:064x}" for i in range(SCALE_ITEMS)]
    catalog = Catalog(
        items=np.arange(SCALE_ITEMS, dtype=np.int64),
        names=[f"x/{i:06d}.jpg" for i in range(SCALE_ITEMS)],
        entries=[{"label": "x", "metadata": {}, "image": f"{d}.jpg", "sha256": d} for d in digests],
        vectors=vectors,
        backbone=vectors,
        thumbs=np.zeros((SCALE_ITEMS, 0), np.float32),
        mirrored=None,
        next_id=SCALE_ITEMS,
    )
    stager = Stager(folder / "stage")
    ref = stager.segment(catalog, n_trees=32, head=False)
    paths = {blob.sha256: path for path, blob in stager.files}
    pointer = folder / "segment.pkl"
    pointer.write_bytes(pickle.dumps((ref, paths)))
    return pointer, copied


class PeakRss:
    """This process's resident memory, sampled every 5 ms by a thread: the peaks above a baseline,
    of all of it and of its anonymous part (the heap: what is not pages of mapped files, which the
    kernel can drop and read again)."""

    def __init__(self) -> None:
        self.baseline = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = tuple(map(max, self.peak, _rss()))

    def __enter__(self) -> PeakRss:
        self.baseline = self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = tuple(map(max, self.peak, _rss()))


def _rss() -> tuple[int, int]:
    """Resident bytes now, and the anonymous ones (/proc/self/statm: pages; resident - shared)."""
    fields = Path("/proc/self/statm").read_text().split()
    page = resource.getpagesize()
    return int(fields[1]) * page, (int(fields[1]) - int(fields[2])) * page


def scale_child(pointer: str, work: str) -> None:
    """In a process of its own (so its memory is the report's): open the segment and report."""
    ref, paths = pickle.loads(Path(pointer).read_bytes())
    view = View(None, [Segment(ref, lambda blob, label: paths[blob.sha256], SCALE_DIM)])  # type: ignore[arg-type]
    view.segments[0].items  # noqa: B018  # opened before the baseline is taken
    started = time.perf_counter()
    with PeakRss() as memory:
        groups = duplicate_report.report(view, False, DEFAULT_THRESHOLD, Path(work))
    seconds = time.perf_counter() - started
    pairs = [[i["id"] for i in g["items"]] for g in groups]
    print(json.dumps({"seconds": seconds, "baseline": memory.baseline, "peak": memory.peak, "groups": pairs}))


def scale_part() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
        started = time.perf_counter()
        pointer, copied = synthetic(Path(tmp))
        build_s = time.perf_counter() - started
        command = [
            sys.executable,
            "-m",
            "bench.duplicates",
            "scale-child",
            str(pointer),
            str(Path(tmp) / "work"),
        ]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    originals = SCALE_ITEMS - SCALE_PLANTED
    truth = {(int(c), originals + n) for n, c in enumerate(copied)}
    found = {(a, b) for g in out["groups"] for i, a in enumerate(sorted(g)) for b in sorted(g)[i + 1 :]}
    right = len(found & truth)
    return {
        "items": SCALE_ITEMS,
        "dim": SCALE_DIM,
        "planted": SCALE_PLANTED,
        "setup_s": round(build_s, 1),
        "seconds": round(out["seconds"], 1),
        "peak_mb": round((out["peak"][0] - out["baseline"][0]) / 2**20, 1),
        "anon_mb": round((out["peak"][1] - out["baseline"][1]) / 2**20, 1),
        "rss_mb": round(out["peak"][0] / 2**20, 1),
        "vectors_mb": round(SCALE_ITEMS * SCALE_DIM * 4 / 2**20, 1),
        "precision": right / len(found) if found else 1.0,
        "recall": right / len(truth),
    }


def run() -> dict[str, Any]:
    return {"quality": quality_part(), "scale": scale_part()}


def _at(points: list[dict[str, float]], threshold: float) -> dict[str, float]:
    return min(points, key=lambda p: abs(p["threshold"] - threshold))


def best_threshold(points: list[dict[str, float]]) -> dict[str, float]:
    """Where precision and recall are both highest: the largest min(precision, recall)."""
    return max(points, key=lambda p: (min(p["precision"], p["recall"]), p["threshold"]))


def markdown(result: dict[str, Any]) -> str:
    q, s = result["quality"], result["scale"]
    service = "service descriptor (whitened backbone)"
    rows = []
    for name, points in q["curves"].items():
        best = best_threshold(points)
        rows.append(
            f"| {name} | {recall_at_precision(points, 0.95):.3f} | {recall_at_precision(points, 0.9):.3f} | "
            f"{best['threshold']:.2f} | {best['precision']:.3f} | {best['recall']:.3f} |"
        )
    at = _at(q["curves"][service], q["threshold"])
    sweep = " ".join(
        f"{p['threshold']:.2f}: {p['precision']:.2f}/{p['recall']:.2f}"
        for p in q["curves"][service]
        if round(p["threshold"] * 100) % 5 == 0 and p["threshold"] >= 0.4
    )
    r = q["report"]
    CANDIDATES = screen.CANDIDATES  # noqa: N806
    return f"""## Duplicates

A planted set of {q["images"]:,} images ({CATALOGUE:,} catalogue items: Fashion-MNIST training images
upscaled to {SIDE} px and scikit-image's photos; {PLANTED} near-duplicates of catalogue items, each
one to three of: resized to 50-90 %, JPEG quality 30-90, cropped by up to 10 %, mirrored,
brightness +-20 %, a small text watermark; {NEGATIVES} hard negatives: another Fashion-MNIST image
of a catalogue item's class), trained through the service (`fine_tune=always`, {q["train_s"]} s).
{q["truth"]} true pairs. Every method is scored on every pair of the set (exact, no index), from
the trained version's own stored vectors; pHash and dHash (imagehash, 64 bits) on the same images,
similarity 1 - Hamming distance / 64.

| method | recall at precision >= 0.95 | recall at precision >= 0.90 | best threshold | precision | recall |
|---|---|---|---|---|---|
{chr(10).join(rows)}

- The service's descriptor at the endpoint's default threshold {q["threshold"]}: precision
  {at["precision"]:.3f}, recall {at["recall"]:.3f} (targets 0.95 / 0.95).
- Its curve (threshold: precision/recall): {sweep}.
- **The report itself** (POST /duplicates's code: the Annoy index of descriptors, 10 neighbours
  per row, groups), at {q["threshold"]}: precision {r["precision"]:.3f}, recall {r["recall"]:.3f},
  {r["pairs"]} pairs in {r["groups"]} groups, {r["seconds"]} s.
- Screening at the door and `?duplicates_only` take the catalogue's candidates from the served
  index ({CANDIDATES} nearest; the fine-tuned head's space here): a copy's original is among them
  for **{q["candidate_recall"]:.3f}** of the planted copies, so their recall is at most that.
- The fine-tuned head is the wrong space for this job: it is trained to pull a class together, so
  another item of the class scores as high as a copy. The backbone whitened on the catalogue's own
  vectors is used (catalog/descriptor.py).

**Scale.** A report over {s["items"]:,} synthetic items ({s["dim"]}-d; {SCALE_KINDS} kinds of item in
{SCALE_KIND_DIMS} directions, each item its own detail in all; {s["planted"]:,}
planted copies), in a process of its own: **{s["seconds"]} s** (target <= 60 s); its resident
memory peaked {s["peak_mb"]} MB above the opened segment's (sampled every 5 ms), of which
**{s["anon_mb"]} MB anonymous** (the heap; the rest: pages of the two memory-mapped indexes, the
served one read a chunk of rows at a time and the descriptors' built on disk, which the kernel
drops and reads again under pressure). The vectors alone are {s["vectors_mb"]} MB.
Precision {s["precision"]:.3f}, recall {s["recall"]:.3f} on the planted copies.
"""


if __name__ == "__main__":
    if sys.argv[1:2] == ["scale-child"]:
        scale_child(sys.argv[2], sys.argv[3])
    else:
        print(markdown(run()))
