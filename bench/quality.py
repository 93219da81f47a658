"""Retrieval quality on Fashion-MNIST: raw pixels vs the frozen offline encoder vs fine-tuned heads.

Protocol: index 10,000 training images and query with 2,000 test images, both drawn with a
fixed seed from the Debian package dataset-fashion-mnist; relevant = same class. The main
fine-tuned row goes through the service's own training path (`training.train` on a zip of the
10,000 images, fine_tune=always), exactly what `POST /fashion/train` does; the ablation rows
train heads with other settings on the same cached backbone vectors.
"""

from __future__ import annotations

import io
import tempfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench import demo
from service import encoders
from service.catalog.evaluation import evaluate, exact_search
from service.catalog.head import HeadEncoder, thumbnails
from service.catalog.images import to_input
from service.core.config import ROOT, Settings
from service.core.endpoint import parse_endpoint
from service.serving.registry import load_version
from service.serving.search import search
from service.storage.blobs import BlobCache
from service.storage.local import LocalStorage
from service.training import train as training
from service.training.head_fit import TrainingData, train_head

INDEXED, QUERIES, SEED = 10_000, 2_000, 0


def sample() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    train_x, train_y = demo.load_fashion_mnist("train")
    test_x, test_y = demo.load_fashion_mnist("t10k")
    rng = np.random.default_rng(SEED)
    i = rng.choice(len(train_x), INDEXED, replace=False)
    j = rng.choice(len(test_x), QUERIES, replace=False)
    return train_x[i], train_y[i].astype(np.int64), test_x[j], test_y[j].astype(np.int64)


def encoder_inputs(images: np.ndarray, size: int) -> np.ndarray:
    return np.stack([to_input(Image.fromarray(a).convert("RGB"), size) for a in images])


def embed(encoder: Any, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Backbone vectors and encoder inputs' thumbnails (16x16) of grayscale images."""
    vectors, thumbs = [], []
    for start in range(0, len(images), batch):
        inputs = encoder_inputs(images[start : start + batch], encoder.input_size)
        vectors.append(encoder.encode(inputs))
        thumbs.append(thumbnails(inputs, 16))
    return np.concatenate(vectors), np.concatenate(thumbs)


def zipped(images: np.ndarray, labels: np.ndarray) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for n, (image, label) in enumerate(zip(images, labels, strict=True)):
            png = io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            zf.writestr(f"{demo.FASHION_CLASSES[label]}/{n:05d}.png", png.getvalue())
    return out.getvalue()


def run() -> dict[str, Any]:
    train_x, train_y, test_x, test_y = sample()
    settings = Settings.load({"warm_on_start": False})
    spec = parse_endpoint(ROOT / "endpoints" / "fashion.toml")
    rows: list[dict[str, Any]] = []

    def row(
        name: str, how: str, database: np.ndarray, queries: np.ndarray, seconds: float | None = None
    ) -> None:
        metrics = evaluate(exact_search(database), train_y, queries, test_y)
        rows.append(
            {
                "method": name,
                "how": how,
                **metrics,
                "dim": int(database.shape[1]),
                "train_s": None if seconds is None else round(seconds, 1),
            }
        )
        print(f"  {name}: {metrics}", flush=True)

    pixels = lambda x: x.reshape(len(x), -1).astype(np.float32)  # noqa: E731
    row("raw pixels", "784 grey values, cosine", pixels(train_x), pixels(test_x))

    backbone = encoders.load(
        encoders.resolve(spec.encoder, "offline", settings.models_dir), settings.hub_cache
    )
    started = time.perf_counter()
    db_vectors, db_thumbs = embed(backbone, train_x)
    embed_s = time.perf_counter() - started
    q_vectors, q_thumbs = embed(backbone, test_x)
    row("frozen offline encoder", "MobileNetV2 (ImageNet) pooled 1280-d", db_vectors, q_vectors)

    mirrored, mirrored_thumbs = embed(backbone, train_x[:, :, ::-1])
    data = TrainingData(db_vectors, db_thumbs, train_y, mirrored, mirrored_thumbs)
    ablations = [
        (
            "plain two-layer head",
            "Dense(256) + cosine softmax classifier; no margin, thumbnail or mirrors",
            replace(spec.head, hidden_dim=0, thumbnail=0, margin=0.0, augment=False),
        ),
        (
            "+ cosine margin, mirrors",
            "CosFace margin 0.2, mirrored copies",
            replace(spec.head, hidden_dim=0, thumbnail=0),
        ),
        (
            "+ thumbnail input",
            "two layers on backbone vector + 16x16 thumbnail",
            replace(spec.head, hidden_dim=0),
        ),
    ]
    for name, how, config in ablations:
        started = time.perf_counter()
        head, _ = train_head(data, list(demo.FASHION_CLASSES), config)
        seconds = time.perf_counter() - started
        row(name, how, head.embed(db_vectors, db_thumbs), head.embed(q_vectors, q_thumbs), seconds)

    # The endpoint's own head, trained the way POST /fashion/train trains it: from a zip alone.
    with tempfile.TemporaryDirectory() as tmp:
        zip_path = Path(tmp) / "fashion-10k.zip"
        zip_path.write_bytes(zipped(train_x, train_y))
        store = LocalStorage(Path(tmp) / "store")
        local = replace(settings, cache_dir=Path(tmp) / "cache")
        started = time.perf_counter()
        result = training.train(spec, zip_path, store, local, fine_tune="always")
        train_s = time.perf_counter() - started
        loaded = load_version(store, spec, result.version, local, BlobCache(store, local.cache_dir))
        assert isinstance(loaded.encoder, HeadEncoder)
        (segment,) = loaded.view.segments  # a train writes one segment
        published = np.asarray(segment.vectors, dtype=np.float32)
        names = [segment.names[i] for i in range(segment.rows)]
        order = np.array([int(Path(n).stem) for n in names])  # rows follow the zip's sorted names
        database = np.empty_like(published)
        database[order] = published
        queries = np.concatenate(
            [
                loaded.encoder.encode(encoder_inputs(test_x[s : s + 64], loaded.encoder.input_size))
                for s in range(0, len(test_x), 64)
            ]
        )
        row(
            "fine-tuned head (the endpoint's, via /train)",
            f"hidden {spec.head.hidden_dim} + feature {spec.head.feature_dim}, thumbnail, margin, mirrors",
            database,
            queries,
            train_s,
        )
        annoy = evaluate(
            lambda q, k: np.array([[order[h.row] for h in search(loaded.view, v, k)] for v in q]),
            train_y,
            queries,
            test_y,
        )
    return {
        "rows": rows,
        "annoy": annoy,
        "embed_images_per_s": round(INDEXED / embed_s, 1),
        "holdout": result.evaluation,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "## Retrieval quality (Fashion-MNIST)",
        "",
        f"Index {INDEXED:,} training images, query with {QUERIES:,} test images (seed {SEED}); relevant = "
        "same class; exact cosine search over each method's vectors. mAP@10 divides by min(10, relevant "
        "items).",
        "",
        "| method | how | P@1 | P@10 | mAP@10 | dim | head training (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        seconds = "" if r["train_s"] is None else r["train_s"]
        lines.append(
            f"| {r['method']} | {r['how']} | {r['precision@1']:.3f} | {r['precision@10']:.3f} | "
            f"{r['map@10']:.3f} | {r['dim']} | {seconds} |"
        )
    a = result["annoy"]
    lines += [
        "",
        f"The endpoint's fine-tuned version served through its Annoy index (what `/infer` returns): "
        f"P@1 {a['precision@1']:.3f}, P@10 {a['precision@10']:.3f}, mAP@10 {a['map@10']:.3f}.",
        f"Its own hold-out check at training time (10% of the zip): frozen P@10 "
        f"{result['holdout']['frozen']['precision@10']:.3f} → fine-tuned "
        f"{result['holdout']['fine_tuned']['precision@10']:.3f}.",
        "The head-training column for the endpoint's row is the whole `training.train` call: decode, "
        "backbone (twice: images and mirrored images), head, index, publish.",
    ]
    return "\n".join(lines)
