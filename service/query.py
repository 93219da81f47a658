"""Queries against a loaded version: images in, ranked matches out (no HTTP here)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np

from . import images, ingest
from .config import Settings
from .endpoint import EndpointSpec
from .errors import BadImageError, InvalidParameterError, ItemNotFoundError, TrainingError
from .evaluation import evaluate
from .index import Neighbour
from .serving import LoadedVersion

# Builds the URL of an item's original image (the API knows its own routes).
# (version, id, the item's metadata entry, already read) -> its URL
ImageUrlFn = Callable[[LoadedVersion, int, dict[str, Any]], str | None]


def check_k(spec: EndpointSpec, k: int | None) -> int:
    """The number of results to return: the endpoint's default, or `k` if within 1..max_k."""
    if k is None:
        return spec.default_k
    if not 1 <= k <= spec.max_k:
        raise InvalidParameterError(
            f"k must be between 1 and {spec.max_k} for endpoint {spec.name!r}, got {k}",
            errors={"k": [f"Must be between 1 and {spec.max_k}."]},
        )
    return k


def embed_uploads(
    loaded: LoadedVersion,
    uploads: list[tuple[str, bytes]],
    max_pixels: int,
    allowed: Collection[str] | None = None,
) -> np.ndarray:
    """Decode every upload (filename, bytes) and embed them in one batch."""
    size = loaded.encoder.input_size
    arrays = []
    for filename, data in uploads:
        try:
            arrays.append(images.prepare(data, size, max_pixels, allowed)[0])
        except BadImageError as exc:
            raise BadImageError(f"{filename}: {exc.message}") from None
    return loaded.encoder.encode(np.stack(arrays))


def matches(
    loaded: LoadedVersion, neighbours: list[Neighbour], image_url: ImageUrlFn
) -> list[dict[str, Any]]:
    """Neighbours as the API returns them: id, name, score, label, metadata, image_url."""
    results = []
    for n in neighbours:
        item = loaded.items[n.id]
        results.append(
            {
                "id": n.id,
                "name": loaded.names[n.id],
                "score": round(n.score, 6),
                "label": item.get("label"),
                "metadata": item.get("metadata") or {},
                "image_url": image_url(loaded, n.id, item),
            }
        )
    return results


def search_images(
    loaded: LoadedVersion,
    uploads: list[tuple[str, bytes]],
    k: int,
    max_pixels: int,
    image_url: ImageUrlFn,
    allowed: Collection[str] | None = None,
) -> list[list[dict[str, Any]]]:
    """The top-k matches for each uploaded image, best first."""
    vectors = embed_uploads(loaded, uploads, max_pixels, allowed)
    return [matches(loaded, loaded.index.query(v, k), image_url) for v in vectors]


def similar_items(loaded: LoadedVersion, item_id: int, k: int, image_url: ImageUrlFn) -> list[dict[str, Any]]:
    """The top-k items most like an indexed item, the item itself excluded."""
    check_item(loaded, item_id)
    return matches(loaded, loaded.index.similar_to_item(item_id, k), image_url)


def check_item(loaded: LoadedVersion, item_id: int) -> None:
    if not 0 <= item_id < loaded.count:
        raise ItemNotFoundError(
            f"no item {item_id} in {loaded.endpoint} version {loaded.version} (ids are 0..{loaded.count - 1})"
        )


def evaluate_zip(loaded: LoadedVersion, zip_path: Path, settings: Settings, k: int = 10) -> dict[str, Any]:
    """Precision@1, precision@k and mAP@k of a served version, queried (through its Annoy index)
    with every labelled image of a zip; relevant = an indexed item with the same label."""
    db_names = sorted({item["label"] for item in loaded.items if item.get("label") is not None})
    ids = {label: i for i, label in enumerate(db_names)}
    # Unlabelled indexed items can never be relevant (-2); labels the index lacks never match (-3).
    database_labels = np.array([ids.get(item.get("label"), -2) for item in loaded.items])
    with ingest.open_zip(zip_path) as zf:
        plan = ingest.plan(zf, ingest.ZipLimits.from_settings(settings))
        inputs, query_labels, skipped = [], [], 0
        for entry in plan.entries:
            if entry.label is None:
                continue
            try:
                data = ingest.read_entry(zf, entry)
                inputs.append(images.prepare(data, loaded.encoder.input_size, settings.max_image_pixels)[0])
                query_labels.append(entry.label)
            except (BadImageError, TrainingError):
                skipped += 1
    if not inputs:
        raise InvalidParameterError("the zip holds no labelled image to evaluate with")
    size = settings.encode_batch_size
    queries = np.concatenate(
        [loaded.encoder.encode(np.stack(inputs[i : i + size])) for i in range(0, len(inputs), size)]
    )

    def annoy_search(vectors: np.ndarray, k: int) -> np.ndarray:
        found = np.full((len(vectors), k), -1, dtype=np.int64)
        for row, vector in enumerate(vectors):
            neighbours = [n.id for n in loaded.index.query(vector, k)]
            found[row, : len(neighbours)] = neighbours
        return found

    metrics = evaluate(
        annoy_search, database_labels, queries, np.array([ids.get(lb, -3) for lb in query_labels]), k
    )
    return {
        "endpoint": loaded.endpoint,
        "version": loaded.version,
        "fine_tuned": bool(loaded.manifest.get("head")),
        **metrics,
        "skipped": skipped,
        "labels_not_in_index": sorted(set(query_labels) - set(ids)),
    }
