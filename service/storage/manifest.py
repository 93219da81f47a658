"""A version's manifest: one typed, versioned structure, built in one place (`Manifest`) and parsed and
validated in one place (`parse`).

Format 2 (content-addressed): a version is a small manifest that references immutable blobs by their
sha256. Its catalog is a list of segments; each segment is a set of blobs (its rows' vectors, index,
ids, names and entries) plus two small blobs a change may replace: a bitmap of deleted rows and an
overlay of edited labels and metadata. Format 1 (a folder of files per version, every change a full
copy) is read through the same structure (`from_legacy`): one segment whose files keep their keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from service.core.errors import IntegrityError

FORMAT = 2
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The files a segment may have; `items`, `names` and `entries` always, `index` and/or `vectors`.
SEGMENT_FILES = (
    "index",  # Annoy index over the served vectors (large segments); holds the vectors too
    "vectors",  # float32 [rows, dim], the served vectors (small segments: searched exactly)
    "items",  # int64 [rows]: each row's stable item id
    "names",  # jsonmap: each row's image name (its path in the zip)
    "entries",  # jsonmap: {"label", "metadata", "image", "sha256", "item_name"?} per row
    "digests",  # uint8 [rows, 32]: each row's image sha256 (the vector cache, garbage collection)
    "keys",  # uint64 [rows]: a hash of each row's item name (finding an item by name)
    "backbone",  # float16 [rows, D]: the backbone's vectors (only with a head)
    "thumbs",  # float16 [rows, T]: the head's thumbnail input
    "mirrored",  # float16 [rows, D]: the backbone's vectors of mirrored images (head augmentation)
)
REQUIRED_SEGMENT_FILES = ("items", "names", "entries")


def blob_key(endpoint: str, sha256: str) -> str:
    """Where a blob lives in the store: written once, never rewritten, named by its content."""
    return f"{endpoint}/blobs/{sha256[:2]}/{sha256}"


@dataclass(frozen=True)
class BlobRef:
    """A file of a version: its sha256 and size; `key` only where it is not the blob's own key (a
    format-1 version's files, which live in the version's folder)."""

    sha256: str
    size: int
    key: str | None = None

    def key_in(self, endpoint: str) -> str:
        return self.key or blob_key(endpoint, self.sha256)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sha256": self.sha256, "size": self.size}
        if self.key:
            out["key"] = self.key
        return out


@dataclass(frozen=True)
class SegmentRef:
    """An immutable segment (`files`) and this version's view of it (`deleted`, `overlay`)."""

    id: str
    rows: int
    live: int  # rows not deleted
    files: Mapping[str, BlobRef]
    deleted: BlobRef | None = None  # packed bitmap (numpy packbits, little-endian) of deleted rows
    overlay: BlobRef | None = None  # JSON {"<row>": {"label", "metadata"}}: edited rows
    images: str | None = None  # a format-1 version's folder its images are under; None: blobs

    @property
    def indexed(self) -> bool:
        return "index" in self.files

    def blobs(self) -> Iterator[BlobRef]:
        yield from self.files.values()
        if self.deleted is not None:
            yield self.deleted
        if self.overlay is not None:
            yield self.overlay

    def image_key(self, endpoint: str, image: str) -> str:
        """The store key of a row's image, from its entry's "image" (images/<sha256><ext>)."""
        if self.images is not None:
            return self.images + image
        return blob_key(endpoint, image.removeprefix("images/").split(".", 1)[0])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "rows": self.rows,
            "live": self.live,
            "files": {name: ref.to_json() for name, ref in sorted(self.files.items())},
        }
        for name in ("deleted", "overlay"):
            ref = getattr(self, name)
            if ref is not None:
                out[name] = ref.to_json()
        if self.images is not None:
            out["images"] = self.images
        return out


@dataclass(frozen=True)
class Head:
    """A fine-tuned version's head: what it is, and its two files."""

    fingerprint: str
    feature_dim: int
    labels: list[str]
    thumbnail: int
    files: Mapping[str, BlobRef]  # head.json, head.npz; head.tflite when fused (training/fuse.py)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "files"}
        return {**out, "files": {name: ref.to_json() for name, ref in sorted(self.files.items())}}


@dataclass(frozen=True)
class Manifest:
    """Everything a version is: how it was built, what serves it, and its segments."""

    endpoint: str
    version: str
    created_at: str
    lineage: str  # the train this version descends from (changes keep their base's)
    base: str | None  # the version a change was built on
    encoder: Mapping[str, Any]  # what built its vectors: source, fingerprint, dim...
    runtime: Mapping[str, Any]  # what runs its encoder: litert (and the evidence) or tensorflow (why)
    dim: int
    metric: str
    n_trees: int
    search_k: int
    count: int  # items
    rows: int  # rows in all segments, deleted ones included
    next_id: int
    labels: Mapping[str, int]  # items per label
    segments: tuple[SegmentRef, ...]
    encoder_model: BlobRef | None = None  # the converted encoder (encoder.tflite)
    head: Head | None = None
    fine_tune: str = "auto"
    evaluation: Mapping[str, Any] = field(default_factory=dict)
    change: Mapping[str, Any] = field(default_factory=dict)  # {"kind": train|add|delete|edit|compact...}
    source_zip: str | None = None
    format: int = FORMAT

    def blobs(self) -> Iterator[BlobRef]:
        """Every file this version references, its images aside (they are in its segments' entries)."""
        for segment in self.segments:
            yield from segment.blobs()
        if self.encoder_model is not None:
            yield self.encoder_model
        if self.head is not None:
            yield from self.head.files.values()

    @property
    def live(self) -> int:
        return sum(s.live for s in self.segments)

    def with_changes(self, **changes: Any) -> Manifest:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.format,
            "endpoint": self.endpoint,
            "version": self.version,
            "created_at": self.created_at,
            "lineage": self.lineage,
            "base": self.base,
            "encoder": dict(self.encoder),
            "runtime": dict(self.runtime),
            "dim": self.dim,
            "metric": self.metric,
            "n_trees": self.n_trees,
            "search_k": self.search_k,
            "count": self.count,
            "rows": self.rows,
            "next_id": self.next_id,
            "labels": dict(self.labels),
            "segments": [s.to_json() for s in self.segments],
            "encoder_model": self.encoder_model.to_json() if self.encoder_model else None,
            "head": self.head.to_json() if self.head else None,
            "fine_tune": self.fine_tune,
            "evaluation": dict(self.evaluation),
            "change": dict(self.change),
            "source_zip": self.source_zip,
        }
        return out

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), indent=1, sort_keys=True).encode()


# --- parsing ---------------------------------------------------------------------------------------


class _Reader:
    """Typed access to a parsed JSON object, naming the manifest and field in every error."""

    def __init__(self, where: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise IntegrityError(f"{where} is not a JSON object")
        self.where, self.data = where, data

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if name not in self.data or self.data[name] is None:
            if default is ...:
                raise IntegrityError(f"{self.where}: {name} is missing")
            return default
        value = self.data[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise IntegrityError(f"{self.where}: {name} has the wrong type")
        return value

    def blob(self, name: str, optional: bool = False) -> BlobRef | None:
        raw = self.get(name, dict, None if optional else ...)
        return None if raw is None else _blob(f"{self.where}: {name}", raw)


def _blob(where: str, raw: Any) -> BlobRef:
    r = _Reader(where, raw)
    sha = r.get("sha256", str)
    if not SHA256.match(sha):
        raise IntegrityError(f"{where}: not a sha256")
    if "key" in raw:  # a blob's key follows from its sha256; only format 1's files have keys of their own
        raise IntegrityError(f"{where}: a blob names no key")
    return BlobRef(sha, r.get("size", int))


def _segment(where: str, raw: Any) -> SegmentRef:
    r = _Reader(where, raw)
    files = {name: _blob(f"{where}: {name}", ref) for name, ref in r.get("files", dict).items()}
    unknown = set(files) - set(SEGMENT_FILES)
    missing = [name for name in REQUIRED_SEGMENT_FILES if name not in files]
    if unknown or missing or not ({"index", "vectors"} & set(files)):
        raise IntegrityError(f"{where}: files {sorted(files)} are not a segment's")
    rows = r.get("rows", int)
    return SegmentRef(
        id=r.get("id", str),
        rows=rows,
        live=r.get("live", int, rows),
        files=files,
        deleted=r.blob("deleted", optional=True),
        overlay=r.blob("overlay", optional=True),
        images=r.get("images", str, None),
    )


def _head(where: str, raw: Any) -> Head | None:
    if raw is None:
        return None
    r = _Reader(where, raw)
    files = {name: _blob(f"{where}: {name}", ref) for name, ref in r.get("files", dict).items()}
    # head.tflite: the head fused with the converted backbone (training/fuse.py), when it was made
    if not {"head.json", "head.npz"} <= set(files) <= {"head.json", "head.npz", "head.tflite"}:
        raise IntegrityError(f"{where}: a head has head.json and head.npz (and maybe head.tflite)")
    return Head(
        r.get("fingerprint", str),
        r.get("feature_dim", int),
        r.get("labels", list),
        r.get("thumbnail", int),
        files,
    )


def parse(data: bytes, endpoint: str, version: str) -> Manifest:
    """A manifest read back from the store, checked; IntegrityError naming what is wrong."""
    where = f"{endpoint} version {version}'s manifest"
    try:
        raw = json.loads(data)
    except ValueError:
        raise IntegrityError(f"{where} is not valid JSON") from None
    if isinstance(raw, dict) and raw.get("format", 1) == 1:
        return from_legacy(raw, endpoint, version)
    if isinstance(raw, dict) and raw.get("format") != FORMAT:
        raise IntegrityError(f"{where} is in format {raw.get('format')!r}, which this release cannot read")
    r = _Reader(where, raw)
    if r.get("endpoint", str) != endpoint or r.get("version", str) != version:
        raise IntegrityError(f"{where} names another version")
    segments = tuple(_segment(f"{where}: segment {i}", s) for i, s in enumerate(r.get("segments", list)))
    return Manifest(
        endpoint=endpoint,
        version=version,
        created_at=r.get("created_at", str, ""),
        lineage=r.get("lineage", str, version),
        base=r.get("base", str, None),
        encoder=r.get("encoder", dict),
        runtime=r.get("runtime", dict, {"name": "tensorflow", "reason": "not recorded"}),
        dim=r.get("dim", int),
        metric=r.get("metric", str, "angular"),
        n_trees=r.get("n_trees", int),
        search_k=r.get("search_k", int, 0),
        count=r.get("count", int),
        rows=r.get("rows", int),
        next_id=r.get("next_id", int),
        labels=r.get("labels", dict, {}),
        segments=segments,
        encoder_model=r.blob("encoder_model", optional=True),
        head=_head(f"{where}: head", raw.get("head")),
        fine_tune=r.get("fine_tune", str, "auto"),
        evaluation=r.get("evaluation", dict, {}),
        change=r.get("change", dict, {}),
        source_zip=r.get("source_zip", str, None),
    )


# --- format 1 --------------------------------------------------------------------------------------

# A format-1 version's files, by their names in its folder, and what they are in a segment.
LEGACY_FILES = {
    "index.ann": "index",
    "vectors.npy": "vectors",
    "rows.npy": "items",
    "ids.json": "names",
    "metadata.json": "entries",
    "backbone.npy": "backbone",
    "thumbs.npy": "thumbs",
    "mirrored.npy": "mirrored",
}


def legacy_prefix(endpoint: str, version: str) -> str:
    return f"{endpoint}/versions/{version}/"


def from_legacy(raw: dict[str, Any], endpoint: str, version: str) -> Manifest:
    """A format-1 manifest (a folder of files per version) as one segment whose files keep their
    keys. Versions built before stable item ids have no rows.npy: their rows are their ids."""
    where = f"{endpoint} version {version}'s manifest (format 1)"
    r = _Reader(where, raw)
    prefix = legacy_prefix(endpoint, version)
    listed = {
        name: _blob(f"{where}: {name}", ref)
        for name, ref in r.get("files", dict).items()
        if name in LEGACY_FILES or name in ("encoder.tflite", "head.json", "head.npz")
    }
    files = {LEGACY_FILES[n]: replace(ref, key=prefix + n) for n, ref in listed.items() if n in LEGACY_FILES}
    if "index" not in files or "names" not in files or "entries" not in files:
        raise IntegrityError(f"{where} lists no index.ann, ids.json or metadata.json")
    rows = r.get("rows", int, None) or r.get("count", int)
    head_raw = raw.get("head")
    head = None
    if head_raw:
        hr = _Reader(f"{where}: head", head_raw)
        head_files = {n: replace(listed[n], key=prefix + n) for n in ("head.json", "head.npz") if n in listed}
        if len(head_files) != 2:
            raise IntegrityError(f"{where}: the head's files are not listed")
        head = Head(
            hr.get("fingerprint", str),
            hr.get("feature_dim", int),
            hr.get("labels", list),
            hr.get("thumbnail", int),
            head_files,
        )
    model = listed.get("encoder.tflite")
    count = r.get("count", int)
    return Manifest(
        endpoint=endpoint,
        version=version,
        created_at=r.get("created_at", str, ""),
        lineage=r.get("lineage", str, version),
        base=r.get("base", str, None),
        encoder=r.get("encoder", dict),
        runtime=r.get("runtime", dict, {"name": "tensorflow", "reason": "built before converted encoders"}),
        dim=r.get("dim", int),
        metric=r.get("metric", str, "angular"),
        n_trees=r.get("n_trees", int, 32),
        search_k=r.get("search_k", int, 0),
        count=count,
        rows=rows,
        next_id=r.get("next_id", int, rows),
        labels=r.get("labels", dict, {}),
        segments=(SegmentRef(id=f"v1-{version}", rows=rows, live=rows, files=files, images=prefix),),
        encoder_model=replace(model, key=prefix + "encoder.tflite") if model else None,
        head=head,
        fine_tune=r.get("fine_tune", str, "auto"),
        evaluation=r.get("evaluation", dict, {}),
        change=r.get("change", dict, {}),
        source_zip=r.get("source_zip", str, None),
        format=1,
    )
