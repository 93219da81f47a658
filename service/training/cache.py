"""The vector cache: what the encoder made of an image before, found by the sha256 of its bytes in
any retained version built by the same encoder, so an image sent again (re-added after a delete,
twice in one zip, in a `replace` train) is not decoded or embedded again."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from service.catalog.segment import Segment
from service.catalog.view import View
from service.core.errors import IntegrityError
from service.storage import KeyNotFoundError, Storage, versions
from service.storage.blobs import BlobCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cached:
    """Where an image's stored encoder outputs are: a row of one of the cache's segments."""

    segment: int
    row: int


class VectorCache:
    """Distinct segments whose rows' backbone vectors, thumbnails and mirrored vectors can stand in
    for a forward pass of this encoder, searched by image digest."""

    def __init__(self, segments: Iterable[Segment] = (), heads: Iterable[bool] = ()) -> None:
        self.segments = list(segments)
        self.heads = list(heads)  # per segment: its version had a head (its backbone is a file)
        self._view = View(None, self.segments)  # type: ignore[arg-type]  # only its digest index

    @classmethod
    def of_versions(
        cls, storage: Storage, endpoint: str, cache: BlobCache, fingerprint: str, thumb_dim: int
    ) -> VectorCache:
        """The segments of every retained version built by the encoder with `fingerprint` and the
        same thumbnail size (the vectors of another encoder are not comparable)."""
        segments: dict[str, tuple[Segment, bool]] = {}
        for version in versions.list_versions(storage, endpoint):
            try:
                manifest = versions.read_manifest(storage, endpoint, version)
            except KeyNotFoundError:
                continue  # pruned meanwhile
            if manifest.encoder.get("fingerprint") != fingerprint:
                continue
            head = manifest.head is not None
            for ref in manifest.segments:
                if ref.id in segments or (head and "backbone" not in ref.files):
                    continue  # fine-tuned before versions kept backbone vectors: not reusable
                if "thumbs" not in ref.files and thumb_dim:
                    continue
                segment = Segment(ref, lambda blob, label: cache.path(endpoint, blob, label), manifest.dim)
                segments[ref.id] = (segment, head)
        return cls([s for s, _ in segments.values()], [h for _, h in segments.values()])

    def get(self, sha256: str) -> Cached | None:
        try:
            found = self._view.find_image(sha256)
        except (IntegrityError, KeyNotFoundError) as exc:  # a segment gone or bad: embed the image
            log.warning("vector cache: %s", exc)
            return None
        return None if found is None else Cached(*found)

    def extension(self, cached: Cached) -> str:
        """The file extension the image was stored under (".jpg")."""
        return os.path.splitext(self.segments[cached.segment].entries[cached.row]["image"])[1]

    def gather(self, found: list[Cached], thumb_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The backbone vectors, thumbnails and (when every row has them) mirrored vectors of these
        rows, in order (read segment by segment: only the rows asked for)."""
        by_segment: dict[int, list[int]] = {}
        for i, c in enumerate(found):
            by_segment.setdefault(c.segment, []).append(i)
        backbone: np.ndarray | None = None
        thumbs = np.zeros((len(found), thumb_dim), np.float32)
        mirrored: np.ndarray | None = None
        complete = True
        for seg, positions in by_segment.items():
            rows = np.array([found[i].row for i in positions], dtype=np.int64)
            b, t, m = self.segments[seg].training_inputs(self.heads[seg], rows)
            if backbone is None:
                backbone = np.zeros((len(found), b.shape[1]), np.float32)
                mirrored = np.zeros((len(found), b.shape[1]), np.float32)
            backbone[positions] = b
            if thumb_dim and t.shape[1] == thumb_dim:
                thumbs[positions] = t
            if m is None:
                complete = False
            elif mirrored is not None:
                mirrored[positions] = m
        return (
            np.zeros((0, 0), np.float32) if backbone is None else backbone,
            thumbs,
            mirrored if complete else None,
        )
