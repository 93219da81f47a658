"""The merge step: embedded images become catalog rows, with stable item ids, merged with a base."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from service.catalog import ingest
from service.catalog.rows import Catalog
from service.storage import Storage, versions
from service.training.embedding import Embedded

# reserve(count, floor) -> the first of `count` new item ids (versions.reserve_ids)
Reserve = Callable[[int, int], int]


def reserver(storage: Storage, endpoint: str) -> Reserve:
    """New item ids from the endpoint's only-growing counter."""
    return lambda count, floor: versions.reserve_ids(storage, endpoint, count, floor)


# id_of(item name) -> the item's id in the version built on, or None when it holds no such item
IdOf = Callable[[str], int | None]


def to_rows(
    embedded: Embedded, plan: ingest.ZipPlan, id_of: IdOf, floor: int, thumb_dim: int, reserve: Reserve
) -> Catalog:
    """The accepted images as catalog rows: cached vectors where the cache had them, item ids kept
    for names the version built on holds (`id_of`), new ids for the others from `reserve` (at
    least `floor`, that version's next id)."""
    backbone, thumbs, mirrored = vectors_of(embedded, thumb_dim)
    fields_of = [dict(plan.metadata.get(a.entry.name, {})) for a in embedded.accepted]
    # The metadata file's `item` column groups photos into one item; without it, the image is one.
    grouped = [f.pop("item", None) for f in fields_of]
    names = [
        str(g) if g not in (None, "") else a.entry.name
        for g, a in zip(grouped, embedded.accepted, strict=True)
    ]
    items, next_id = _item_ids(names, id_of, floor, reserve)
    entries = []
    for accepted, fields, item_name in zip(embedded.accepted, fields_of, names, strict=True):
        entry = {
            "label": accepted.entry.label,
            "metadata": fields,
            "image": accepted.image,
            "sha256": accepted.sha256,
        }
        if item_name != accepted.entry.name:
            entry["item_name"] = item_name
        entries.append(entry)
    return Catalog(
        items=items,
        names=[a.entry.name for a in embedded.accepted],
        entries=entries,
        vectors=backbone,
        backbone=backbone,
        thumbs=thumbs,
        mirrored=mirrored,
        next_id=next_id,
        image_sources=[None] * len(names),
    )


def vectors_of(embedded: Embedded, thumb_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Backbone vectors, thumbnails and (when every row has them) mirrored vectors, row for row:
    from this job's forward passes, or from the vector cache."""
    n = len(embedded.accepted)
    firsts = [(i, a) for i, a in enumerate(embedded.accepted) if a.same_as is None]
    new_rows = [i for i, a in firsts if a.cached is None]
    old_rows = [i for i, a in firsts if a.cached is not None]
    found = [a.cached for _, a in firsts if a.cached is not None]
    old_b, old_t, old_m = embedded.cache.gather(found, thumb_dim)
    dim = embedded.vectors[0].shape[1] if embedded.vectors else old_b.shape[1]
    backbone, thumbs = np.zeros((n, dim), np.float32), np.zeros((n, thumb_dim), np.float32)
    # Mirrored vectors only when every row has one: the head trains without them otherwise.
    with_mirror = (bool(embedded.mirrored) or not new_rows) and (old_m is not None or not old_rows)
    mirrored = np.zeros((n, dim), np.float32) if with_mirror else None
    if new_rows:
        backbone[new_rows] = np.concatenate(embedded.vectors)
        if embedded.thumbs:
            thumbs[new_rows] = np.concatenate(embedded.thumbs)
        if mirrored is not None and embedded.mirrored:
            mirrored[new_rows] = np.concatenate(embedded.mirrored)
    if old_rows:
        backbone[old_rows], thumbs[old_rows] = old_b, old_t
        if mirrored is not None and old_m is not None:
            mirrored[old_rows] = old_m
    again = [(i, a.same_as) for i, a in enumerate(embedded.accepted) if a.same_as is not None]
    for i, earlier in again:  # the same bytes twice: the same outputs
        backbone[i], thumbs[i] = backbone[earlier], thumbs[earlier]
        if mirrored is not None:
            mirrored[i] = mirrored[earlier]
    return backbone, thumbs, mirrored


def _item_ids(names: list[str], id_of: IdOf, floor: int, reserve: Reserve) -> tuple[np.ndarray, int]:
    """Each row's item id (the base's for a name it holds, a new one otherwise) and the next id."""
    known: dict[str, int] = {}
    for name in dict.fromkeys(names):
        found = id_of(name)
        if found is not None:
            known[name] = found
    new_names = [name for name in dict.fromkeys(names) if name not in known]
    start = reserve(len(new_names), floor)
    known.update({name: start + i for i, name in enumerate(new_names)})
    return np.array([known[name] for name in names], dtype=np.int64), start + len(new_names)
