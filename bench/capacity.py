"""What a catalogue costs a web instance, measured for docs/CAPACITY.md: the files of one segment
(written by the service's own `segment.write`, 32 trees) for synthetic catalogues of 100,000
items at 256-d and 1,280-d and 1,000,000 items at 256-d; which of them a web instance serves
(index and maps) and which only changes read (backbone, thumbnails); and the index build time.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.catalog import segment
from service.catalog.rows import Catalog
from service.core.config import ROOT

SIZES = [(100_000, 256), (100_000, 1280), (int(os.environ.get("CAPACITY_LARGE", "1000000")), 256)]
SERVED = ("index", "vectors", "items", "names", "entries", "digests", "keys")  # what a query reads
LABELS = ["shirt", "trouser", "dress", "coat", "sandal", "bag"]


def synthetic(n: int, dim: int, rng: np.random.Generator) -> Catalog:
    """n items in 200 clusters, with the names, labels and metadata of a typical shop row."""
    centres = rng.standard_normal((200, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, 200, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    names = [f"{LABELS[i % 6]}/item-{i:07d}.jpg" for i in range(n)]
    entries = [
        {
            "label": LABELS[i % 6],
            "metadata": {"sku": f"SKU-{i:07d}", "price": round(float(i % 500) + 0.99, 2)},
            "image": f"images/{i:064x}.jpg",
            "sha256": f"{i:064x}",
        }
        for i in range(n)
    ]
    return Catalog(
        items=np.arange(n, dtype=np.int64),
        names=names,
        entries=entries,
        vectors=vectors,
        backbone=vectors,
        thumbs=np.zeros((n, 0), np.float32),
        mirrored=None,
        next_id=n,
    )


def measure(n: int, dim: int, work: Path) -> dict[str, Any]:
    catalog = synthetic(n, dim, np.random.default_rng(n + dim))
    started = time.perf_counter()
    parts = segment.write(catalog, work / f"{n}-{dim}", n_trees=32, head=False)
    seconds = time.perf_counter() - started
    sizes = {name: path.stat().st_size for name, path in parts.items()}
    served = sum(size for name, size in sizes.items() if name in SERVED)
    print(f"  {n:,} x {dim}-d: {served / n:.0f} B/item served, written in {seconds:.0f} s", flush=True)
    for path in parts.values():
        path.unlink()
    return {
        "items": n,
        "dim": dim,
        "served_bytes_per_item": round(served / n),
        "index_bytes_per_item": round(sizes.get("index", 0) / n),
        "maps_bytes_per_item": round((served - sizes.get("index", 0)) / n),
        "parts": {name: round(size / n, 1) for name, size in sizes.items()},
        "write_s": round(seconds, 1),
    }


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=ROOT / "cache", prefix="bench-capacity-") as tmp:
        return {"sizes": [measure(n, dim, Path(tmp)) for n, dim in SIZES]}


def markdown(r: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {s['items']:,} | {s['dim']} | {s['index_bytes_per_item']:,} | {s['maps_bytes_per_item']:,} | "
        f"**{s['served_bytes_per_item']:,}** | {s['write_s']} |"
        for s in r["sizes"]
    )
    return f"""## What a catalogue costs a web instance

One segment written by the service (`segment.write`, 32 trees) for synthetic catalogues: clustered
unit vectors, a typical shop row (name, label, an SKU and a price). Served = what a query reads
(the Annoy index, which holds the vectors, and the item, name, entry, digest and name-key maps);
changes also read the backbone vectors and thumbnails of a fine-tuned version, which web instances
never load. docs/CAPACITY.md turns these into the largest catalogue per instance size.

| items | dim | index B/item | maps B/item | served B/item | written in s |
|---|---|---|---|---|---|
{rows}
"""
