"""A catalogue that changes: adding 100 images and a `replace` train with 1% changed, each against a
full train of the same 10,000-image catalogue, measured side by side in this run."""

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
from service.core.config import ROOT, Settings
from service.core.endpoint import parse_endpoint
from service.storage.local import LocalStorage
from service.training import changes
from service.training import train as training

SIZE = 10_000
ADDED = 100
CHANGED = 100  # 1% of SIZE


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def run() -> dict[str, Any]:
    images, labels = demo.load_fashion_mnist("train")
    pick = np.random.default_rng(7).choice(len(images), SIZE + ADDED + CHANGED, replace=False)
    base, extra, swap = pick[:SIZE], pick[SIZE : SIZE + ADDED], pick[SIZE + ADDED :]

    def name(n: int) -> str:
        return f"{demo.FASHION_CLASSES[labels[n]]}/{n:05d}.png"

    catalogue = {name(n): _png(images[n]) for n in base}
    spec = parse_endpoint(ROOT / "endpoints" / "fashion.toml")
    settings = Settings.load({"warm_on_start": False})
    result: dict[str, Any] = {"images": SIZE, "added": ADDED, "changed": CHANGED, "fine_tune": "never"}
    with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
        work = Path(tmp)
        local = replace(settings, cache_dir=work / "cache", encode_batch_size=64)
        full_zip = _zip(work / "full.zip", catalogue)
        # The 1% changed: other images under 100 of the same names.
        changed = dict(catalogue)
        for old, new in zip(list(catalogue)[:: SIZE // CHANGED][:CHANGED], swap, strict=True):
            changed[old] = _png(images[new])
        replace_zip = _zip(work / "replace.zip", changed)
        added_zip = _zip(work / "added.zip", {name(n): _png(images[n]) for n in extra})

        store = LocalStorage(work / "store")
        rows = []

        def timed(what: str, fn: Any) -> Any:
            started = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - started
            counts = out.counts
            rows.append(
                {
                    "what": what,
                    "seconds": round(seconds, 2),
                    "embedded": counts.get("embedded"),
                    "reused": counts.get("reused"),
                }
            )
            print(f"  {rows[-1]}", flush=True)
            return out

        timed(
            "full train, 10,000 images",
            lambda: training.train(spec, full_zip, store, local, fine_tune="never"),
        )
        timed(
            "add 100 images",
            lambda: changes.add_items(spec, added_zip, store, local, fine_tune="never"),
        )
        timed(
            "replace train, 1% of the images changed",
            lambda: training.train(spec, replace_zip, store, local, fine_tune="never"),
        )
        # The full train again in a fresh store, after the others: the reference is the faster of
        # the two runs (the first pays the process's warm-up).
        fresh = LocalStorage(work / "fresh")
        timed(
            "full train again (fresh store)",
            lambda: training.train(spec, full_zip, fresh, local, fine_tune="never"),
        )
        full = min(rows[0]["seconds"], rows[3]["seconds"])
        result["full_s"] = full
        result["rows"] = rows
        result["add_ratio"] = round(rows[1]["seconds"] / full, 3)
        result["replace_ratio"] = round(rows[2]["seconds"] / full, 3)
    return result


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "## Catalogue changes",
        "",
        f"A {r['images']:,}-image Fashion-MNIST catalogue on the local store (`fine_tune=never`), timed "
        "from the zip to the published version. The reference is a full train of the same catalogue "
        "in the same run (the faster of two: one before the changes, one after in a fresh store).",
        "",
        "| change | seconds | images embedded | vectors reused |",
        "|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['what']} | {row['seconds']} | {row['embedded']} | {row['reused']} |")
    lines += [
        "",
        f"- Adding {r['added']} images: **{r['add_ratio']:.1%}** of the full train's {r['full_s']} s "
        "(target ≤ 10%).",
        f"- A `replace` train with {r['changed']} images changed: **{r['replace_ratio']:.1%}** of it "
        "(target ≤ 15%).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(run()))
