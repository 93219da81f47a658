"""Queries against a loaded version: images in, ranked matches out (no HTTP here)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.catalog import descriptor, images, ingest
from service.catalog.duplicates import CANDIDATES
from service.catalog.evaluation import evaluate
from service.catalog.head import HeadEncoder
from service.catalog.view import View
from service.core import metrics
from service.core.config import Settings
from service.core.endpoint import EndpointSpec, QueryConfig
from service.core.errors import BadImageError, InvalidParameterError, ItemNotFoundError, TrainingError
from service.core.vectors import normalise
from service.serving import filters
from service.serving.registry import LoadedVersion
from service.serving.search import Hit, MaskFn, entry_of, filter_mask, one_row_per_item, row_vector, search

# Decodes at once per process (each within the decode memory budget), and images per forward pass.
DECODE_SLOTS = max(2, os.cpu_count() or 2)
_DECODE_SLOTS = threading.BoundedSemaphore(DECODE_SLOTS)
FORWARD_CHUNK = 16

# Builds the URL of an item's original image (the API knows its own routes): (version, item id,
# which of the item's photos (0: its first), the image's store key, its content type) -> its URL
ImageUrlFn = Callable[[LoadedVersion, int, int, str, str | None], str | None]


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
    backbone: list[np.ndarray] | None = None,
) -> np.ndarray:
    """Decode every upload (filename, bytes) and embed them, in forward passes of at most
    FORWARD_CHUNK images; at most DECODE_SLOTS decodes run at once in this process (a decode's
    memory is bounded by the image budget, so this bounds the process's). `backbone`: a list the
    backbone's vectors are appended to as well (what duplicates are judged on)."""
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
    return np.concatenate([query_vectors(loaded, chunk, backbone) for chunk in chunks])


def query_vectors(
    loaded: LoadedVersion, chunk: np.ndarray, backbone: list[np.ndarray] | None = None
) -> np.ndarray:
    """A batch of encoder inputs as query vectors: with `[query] mirror`, each averaged with its
    mirror image's (both in one forward pass). `backbone`: gets the images' backbone vectors."""
    n = len(chunk)
    mirror = loaded.query.mirror
    batch = np.concatenate([chunk, chunk[:, :, ::-1]]) if mirror else chunk
    vectors, backbone_vectors = _encode(loaded, batch, backbone is not None)
    if backbone is not None:
        backbone.extend(backbone_vectors[:n])  # duplicates are judged on the image itself
    return normalise(vectors[:n] + vectors[n:]) if mirror else vectors


def _encode(loaded: LoadedVersion, batch: np.ndarray, backbone: bool) -> tuple[np.ndarray, np.ndarray]:
    """The served vectors of a batch, and (when asked) the backbone's."""
    encoder = loaded.encoder
    if not backbone:
        return encoder.encode(batch), batch[:0]
    if isinstance(encoder, HeadEncoder):
        return encoder.encode_both(batch)
    vectors = encoder.encode(batch)
    return vectors, vectors


def expand(view: View, vector: np.ndarray, hits: list[Hit], config: QueryConfig) -> np.ndarray:
    """Alpha-query expansion: the query plus its best `config.expansion` matches, each weighted
    by its score ** alpha (their vectors as the index holds them), normalised."""
    out = normalise(np.asarray(vector, dtype=np.float32)[None, :])[0]
    for hit in hits[: config.expansion]:
        out = out + max(hit.score, 0.0) ** config.alpha * row_vector(view, hit.segment, hit.row)
    return normalise(out[None, :])[0]


def ranked(
    view: View,
    vector: np.ndarray,
    k: int,
    config: QueryConfig,
    mask: MaskFn | None = None,
    exclude: int | None = None,
) -> list[Hit]:
    """The k best items for a query vector, with the endpoint's query expansion (one more search)."""
    if not config.expansion:
        return search(view, vector, k, mask, exclude)
    hits = search(view, vector, config.expansion, mask, exclude)
    return search(view, expand(view, vector, hits, config), k, mask, exclude) if hits else hits


def matches(loaded: LoadedVersion, hits: list[Hit], image_url: ImageUrlFn) -> list[dict[str, Any]]:
    """Hits as the API returns them: item id and name, score, label, metadata, and the photo that
    matched (an item with several photos is ranked by its best one)."""
    results = []
    for hit in hits:
        item_id, entry, photo = entry_of(loaded.view, hit)
        segment = loaded.view.segments[hit.segment]
        key = segment.ref.image_key(loaded.endpoint, entry["image"])
        mimetype = images.CONTENT_TYPES.get(os.path.splitext(entry["image"])[1])
        result = {
            "id": item_id,
            "name": entry.get("item_name") or photo,
            "score": round(hit.score, 6),
            "label": entry.get("label"),
            "metadata": entry.get("metadata") or {},
            "image_url": image_url(loaded, item_id, _photo_index(loaded, hit, item_id), key, mimetype),
        }
        if "item_name" in entry:
            result["photo"] = photo
        results.append(result)
    return results


def _photo_index(loaded: LoadedVersion, hit: Hit, item_id: int) -> int:
    if one_row_per_item(loaded.view.segments[hit.segment]):
        return 0
    found = loaded.view.item_rows(item_id)
    if found is None or len(found.rows) == 1:
        return 0
    return int(np.searchsorted(found.rows, hit.row))


def search_images(
    loaded: LoadedVersion,
    uploads: list[tuple[str, bytes]],
    k: int,
    max_pixels: int,
    image_url: ImageUrlFn,
    allowed: Collection[str] | None = None,
    flt: filters.Filter | None = None,
    duplicates: Duplicates | None = None,
) -> list[list[dict[str, Any]]]:
    """The top-k matches for each uploaded image, best first; with a filter, only items it keeps;
    with `duplicates`, each marked `duplicate` (or only those, `duplicates.only`)."""
    backbone: list[np.ndarray] | None = None if duplicates is None else []
    vectors = embed_uploads(loaded, uploads, max_pixels, allowed, backbone)
    mask = None if flt is None else filter_mask(flt)
    config = loaded.query
    if duplicates is None or backbone is None:
        return [matches(loaded, ranked(loaded.view, v, k, config, mask), image_url) for v in vectors]
    found = []
    for vector, mine in zip(vectors, backbone, strict=True):
        # Only-duplicates asks for more candidates (a copy ranks first by the descriptors, not
        # always by the served vectors), from the plain query (expansion pulls it towards its
        # class, away from a copy).
        if duplicates.only:
            hits = search(loaded.view, vector, max(k, CANDIDATES), mask)
        else:
            hits = ranked(loaded.view, vector, k, config, mask)
        scores = duplicate_scores(loaded, mine, hits)
        results = matches(loaded, hits, image_url)
        for result, score in zip(results, scores, strict=True):
            result["duplicate"] = bool(score >= duplicates.threshold)
            result["duplicate_score"] = round(score, 6)
        if duplicates.only:
            results = sorted((r for r in results if r["duplicate"]), key=lambda r: -r["duplicate_score"])[:k]
        found.append(results)
    return found


@dataclass(frozen=True)
class Duplicates:
    """A query that marks duplicates: at or above `threshold`; `only`: return just those."""

    threshold: float
    only: bool = False


def duplicate_scores(loaded: LoadedVersion, backbone: np.ndarray, hits: list[Hit]) -> list[float]:
    """Each hit's duplicate score to a query: its whitened descriptors' cosine."""
    head = loaded.manifest.head is not None
    whitening = descriptor.of_view(loaded.view, head)
    if not hits:
        return []
    mine = whitening.apply(np.asarray(backbone, dtype=np.float32)[None, :])[0]
    rows = [descriptor.backbone_of(loaded.view.segments[h.segment], head, np.array([h.row])) for h in hits]
    theirs = whitening.apply(np.concatenate(rows))  # one projection for every hit
    return [whitening.score(float(cosine)) for cosine in theirs @ mine]


# The most photos of one item `similar` searches with (an item may have up to MAX_PHOTOS_PER_ITEM).
SIMILAR_PHOTOS = 8


def similar_items(
    loaded: LoadedVersion, item_id: int, k: int, image_url: ImageUrlFn, flt: filters.Filter | None = None
) -> list[dict[str, Any]]:
    """The top-k items most like an indexed item (its photos: an item ranks by its best match to any
    of them; at most SIMILAR_PHOTOS of them, spread over its photos, so the work is bounded), the
    item itself excluded; with a filter, only items it keeps."""
    found = loaded.view.item_rows(item_id)
    if found is None:
        raise ItemNotFoundError(f"no item {item_id} in {loaded.endpoint} version {loaded.version}")
    rows = found.rows
    if len(rows) > SIMILAR_PHOTOS:
        rows = rows[np.linspace(0, len(rows) - 1, SIMILAR_PHOTOS).round().astype(int)]
    vectors = np.asarray(loaded.view.segments[found.segment].vectors[rows], dtype=np.float32)
    mask: MaskFn | None = None if flt is None else filter_mask(flt)
    best: dict[tuple[int, int], Hit] = {}
    for vector in vectors:
        for hit in ranked(loaded.view, vector, k, loaded.query, mask, exclude=item_id):
            item = (hit.segment, int(loaded.view.segments[hit.segment].items[hit.row]))
            if item not in best or hit.score > best[item].score:
                best[item] = hit
    top = sorted(best.values(), reverse=True)[:k]
    return matches(loaded, top, image_url)


def check_item(loaded: LoadedVersion, item_id: int) -> None:
    if loaded.view.item_rows(item_id) is None:
        raise ItemNotFoundError(f"no item {item_id} in {loaded.endpoint} version {loaded.version}")


def evaluate_zip(loaded: LoadedVersion, zip_path: Path, settings: Settings, k: int = 10) -> dict[str, Any]:
    """Precision@1, precision@k and mAP@k of a served version, queried (through its index) with every
    labelled image of a zip; relevant = an indexed item with the same label."""
    view = loaded.view
    offsets = np.cumsum([0] + [s.rows for s in view.segments])
    row_labels: list[str | None] = []
    for segment in view.segments:
        dead = segment.deleted
        row_labels.extend(None if dead[r] else segment.entry(r).get("label") for r in range(segment.rows))
    db_names = sorted({label for label in row_labels if label is not None})
    ids = {label: i for i, label in enumerate(db_names)}
    # Unlabelled or deleted rows can never be relevant (-2); labels the index lacks never match (-3).
    database_labels = np.array([ids.get(label, -2) if label is not None else -2 for label in row_labels])
    inputs, query_labels, skipped = _labelled_inputs(loaded, zip_path, settings)
    size = settings.encode_batch_size
    queries = np.concatenate(
        [query_vectors(loaded, np.stack(inputs[i : i + size])) for i in range(0, len(inputs), size)]
    )

    def indexed_search(vectors: np.ndarray, k: int) -> np.ndarray:
        found = np.full((len(vectors), k), -1, dtype=np.int64)
        for row, vector in enumerate(vectors):
            hits = [int(offsets[h.segment] + h.row) for h in ranked(view, vector, k, loaded.query)]
            found[row, : len(hits)] = hits
        return found

    scores = evaluate(
        indexed_search, database_labels, queries, np.array([ids.get(lb, -3) for lb in query_labels]), k
    )
    return {
        "endpoint": loaded.endpoint,
        "version": loaded.version,
        "fine_tuned": loaded.manifest.head is not None,
        **scores,
        "skipped": skipped,
        "labels_not_in_index": sorted(set(query_labels) - set(ids)),
    }


def _labelled_inputs(
    loaded: LoadedVersion, zip_path: Path, settings: Settings
) -> tuple[list[np.ndarray], list[str], int]:
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
    return inputs, query_labels, skipped
