"""Queries against a loaded version: images in, ranked matches out (no HTTP here)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np

from service.catalog import images, ingest
from service.catalog.evaluation import evaluate
from service.catalog.index import Neighbour
from service.core import metrics
from service.core.config import Settings
from service.core.endpoint import EndpointSpec
from service.core.errors import BadImageError, InvalidParameterError, ItemNotFoundError, TrainingError
from service.serving import filters
from service.serving.registry import LoadedVersion

# Decodes at once per process (each within the decode memory budget), and images per forward pass.
DECODE_SLOTS = max(2, os.cpu_count() or 2)
_DECODE_SLOTS = threading.BoundedSemaphore(DECODE_SLOTS)
FORWARD_CHUNK = 16

# Builds the URL of an item's original image (the API knows its own routes).
# (version, item id, which of the item's photos (0: its first), the row's entry, already read) -> its URL
ImageUrlFn = Callable[[LoadedVersion, int, int, dict[str, Any]], str | None]


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
    """Decode every upload (filename, bytes) and embed them, in forward passes of at most
    FORWARD_CHUNK images; at most DECODE_SLOTS decodes run at once in this process (a decode's
    memory is bounded by the image budget, so this bounds the process's)."""
    size = loaded.encoder.input_size
    arrays = []
    for filename, data in uploads:
        try:
            with _DECODE_SLOTS:
                arrays.append(images.prepare(data, size, max_pixels, allowed)[0])
        except BadImageError as exc:
            metrics.IMAGES_DECODED.labels("refused").inc()
            raise BadImageError(f"{filename}: {exc.message}") from None
        metrics.IMAGES_DECODED.labels("ok").inc()
    chunks = [np.stack(arrays[i : i + FORWARD_CHUNK]) for i in range(0, len(arrays), FORWARD_CHUNK)]
    return np.concatenate([loaded.encoder.encode(chunk) for chunk in chunks])


def matches(
    loaded: LoadedVersion, neighbours: list[Neighbour], image_url: ImageUrlFn
) -> list[dict[str, Any]]:
    """Neighbours (rows) as the API returns them: item id and name, score, label, metadata, and the
    photo that matched (an item with several photos is ranked by its best one)."""
    results = []
    for n in neighbours:
        item_id = int(loaded.item_of[n.id])
        entry = loaded.items[n.id]
        photo = loaded.names[n.id]
        result = {
            "id": item_id,
            "name": entry.get("item_name") or photo,
            "score": round(n.score, 6),
            "label": entry.get("label"),
            "metadata": entry.get("metadata") or {},
            "image_url": image_url(loaded, item_id, _photo_index(loaded, item_id, n.id), entry),
        }
        if "item_name" in entry:
            result["photo"] = photo
        results.append(result)
    return results


def _photo_index(loaded: LoadedVersion, item_id: int, row: int) -> int:
    if len(loaded.item_of) == loaded.count:  # one photo per item
        return 0
    return int(np.searchsorted(loaded.rows_of(item_id), row))


def best_items(
    loaded: LoadedVersion, search: Callable[[int], list[Neighbour]], k: int, exclude: int | None = None
) -> list[Neighbour]:
    """The best row of each of the top-k items. `search(n)` gives the n nearest rows; rows of
    deleted items (and of `exclude`) are passed over, so the search goes deeper while they fill it."""
    extra = len(loaded.item_of) - loaded.count  # rows that are not an item's first: tombstones
    n = min(len(loaded.item_of), k + min(extra, 4 * k) + (1 if exclude is not None else 0))
    while True:
        found: list[Neighbour] = []
        seen: set[int] = set()
        neighbours = search(n)
        for neighbour in neighbours:
            item = int(loaded.item_of[neighbour.id])
            if item < 0 or item == exclude or item in seen:
                continue
            seen.add(item)
            found.append(neighbour)
            if len(found) == k:
                return found
        if n >= len(loaded.item_of) or len(neighbours) < n:
            return found
        n = min(len(loaded.item_of), 2 * n)


def search_images(
    loaded: LoadedVersion,
    uploads: list[tuple[str, bytes]],
    k: int,
    max_pixels: int,
    image_url: ImageUrlFn,
    allowed: Collection[str] | None = None,
    flt: filters.Filter | None = None,
) -> list[list[dict[str, Any]]]:
    """The top-k matches for each uploaded image, best first; with a filter, only items it keeps."""
    vectors = embed_uploads(loaded, uploads, max_pixels, allowed)
    if flt is None:
        if len(loaded.item_of) == loaded.count:  # one row per item, none deleted: the plain search
            return [matches(loaded, loaded.index.query(v, k), image_url) for v in vectors]
        return [matches(loaded, best_items(loaded, _searcher(loaded, v), k), image_url) for v in vectors]
    mask, groups = _filter_mask(loaded, flt)
    return [matches(loaded, loaded.index.query_masked(v, k, mask, groups), image_url) for v in vectors]


def _searcher(loaded: LoadedVersion, vector: np.ndarray) -> Callable[[int], list[Neighbour]]:
    """search(n): the n nearest rows to `vector`."""
    return lambda n: loaded.index.query(vector, n)


def similar_items(
    loaded: LoadedVersion, item_id: int, k: int, image_url: ImageUrlFn, flt: filters.Filter | None = None
) -> list[dict[str, Any]]:
    """The top-k items most like an indexed item (all its photos), the item itself excluded; with
    a filter, only items it keeps."""
    check_item(loaded, item_id)
    rows = [int(r) for r in loaded.rows_of(item_id)]
    if flt is not None:
        mask, groups = _filter_mask(loaded, flt)
        mask[rows] = False
        vectors = loaded.index.item_vectors(np.array(rows))
        found = [n for v in vectors for n in loaded.index.query_masked(v, k, mask, groups)]
        return matches(loaded, _best_per_item(loaded, found, k), image_url)

    def search(n: int) -> list[Neighbour]:
        if len(rows) == 1:
            return loaded.index.similar_to_item(rows[0], n)
        # Every photo's neighbours, best score first: an item ranks by its best match to any photo.
        best: dict[int, Neighbour] = {}
        for row in rows:
            for m in loaded.index.similar_to_item(row, n):
                if m.id not in best or m.score > best[m.id].score:
                    best[m.id] = m
        return sorted(best.values(), key=lambda m: -m.score)[:n]

    found = best_items(loaded, search, k, exclude=item_id)
    return matches(loaded, found, image_url)


def _filter_mask(loaded: LoadedVersion, flt: filters.Filter) -> tuple[np.ndarray, np.ndarray | None]:
    """The rows the filter keeps (never a deleted item's), and the row -> item map when items
    have several rows (so the search returns k distinct items)."""
    mask = filters.evaluate(flt, loaded.items, loaded.filter_columns) & (loaded.item_of >= 0)
    return mask, (None if len(loaded.item_of) == loaded.count else loaded.item_of)


def _best_per_item(loaded: LoadedVersion, found: list[Neighbour], k: int) -> list[Neighbour]:
    best: dict[int, Neighbour] = {}
    for n in found:
        item = int(loaded.item_of[n.id])
        if item not in best or n.score > best[item].score:
            best[item] = n
    return sorted(best.values(), key=lambda n: -n.score)[:k]


def check_item(loaded: LoadedVersion, item_id: int) -> None:
    if not len(loaded.rows_of(item_id)):
        raise ItemNotFoundError(f"no item {item_id} in {loaded.endpoint} version {loaded.version}")


def evaluate_zip(loaded: LoadedVersion, zip_path: Path, settings: Settings, k: int = 10) -> dict[str, Any]:
    """Precision@1, precision@k and mAP@k of a served version, queried (through its Annoy index)
    with every labelled image of a zip; relevant = an indexed item with the same label."""
    db_names = sorted({item["label"] for item in loaded.items if item.get("label") is not None})
    ids = {label: i for i, label in enumerate(db_names)}
    # Unlabelled indexed items can never be relevant (-2); labels the index lacks never match (-3).
    database_labels = np.array(
        [ids.get(item.get("label"), -2) if item.get("item", 0) >= 0 else -2 for item in loaded.items]
    )
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
