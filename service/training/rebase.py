"""Publishing a change: build it on the current version, publish it only while that is still current,
and build it again on the winner when another change got there first (its images are not embedded
again: only the merge is redone)."""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from service.catalog import rows
from service.catalog.head import HEAD_FILES, Head
from service.catalog.rows import Catalog
from service.core.config import Settings
from service.core.endpoint import EndpointSpec
from service.core.errors import ConflictError
from service.encoders import litert
from service.storage import KeyNotFoundError, Storage, versions
from service.training import steps
from service.training.results import ChangeResult

log = logging.getLogger(__name__)

# A change rebuilt this many times in a row (each time another change won the race) gives up.
MAX_REBASES = 20

Carried = dict[str, tuple[str, dict[str, Any]]]  # file name -> (the base's key, its manifest entry)


@dataclass
class Base:
    """The version a change is built on."""

    pointer: versions.Pointer
    manifest: dict[str, Any]
    rows: Catalog
    head: Head | None

    def carry(self, endpoint: str, names: Iterable[str]) -> Carried:
        """Files of this version that the new one keeps as they are (copied inside the store)."""
        prefix = versions.version_prefix(endpoint, self.pointer.version or "")
        files = self.manifest["files"]
        return {name: (prefix + name, files[name]) for name in names if name in files}


@dataclass
class Built:
    """A change built in a staging folder: its manifest, the base's files it keeps, its result."""

    manifest: dict[str, Any]
    carried: Carried
    result: ChangeResult


class Change(Protocol):
    """One kind of change. `vectors`: whether `build` needs the base's vectors (not only its maps)."""

    vectors: bool

    def build(self, base: Base | None, staging: Path) -> Built: ...


def read_base(storage: Storage, spec: EndpointSpec, vectors: bool = True) -> Base | None:
    """The current version; without `vectors`, only its maps and ids (an edit, most deletes)."""
    pointer = versions.read_current(storage, spec.name)
    if pointer.version is None:
        return None
    manifest = versions.read_manifest(storage, spec.name, pointer.version)
    catalog = rows.read(storage, spec.name, pointer.version, manifest, vectors=vectors)
    head = None
    if manifest.get("head") and vectors:
        with tempfile.TemporaryDirectory(prefix="head-") as tmp:
            prefix = versions.version_prefix(spec.name, pointer.version)
            for name in HEAD_FILES:
                storage.download(prefix + name, Path(tmp) / name)
            head = Head.load(Path(tmp))
    return Base(pointer, manifest, catalog, head)


def publish_with_rebase(
    storage: Storage, spec: EndpointSpec, settings: Settings, change: Change
) -> ChangeResult:
    """Build `change` on the current version and publish it; on a lost race, build it again on the
    winner. A base pruned while it was read is a lost race too (a newer version is current)."""
    for attempt in range(MAX_REBASES):
        try:
            base = read_base(storage, spec, change.vectors)
        except KeyNotFoundError:
            if attempt + 1 < MAX_REBASES:  # pruned while we read it: a newer version is current
                continue
            raise
        version = versions.new_version_id()
        try:
            with steps.work_folder(settings, spec.name, "change") as tmp:
                built = _build(change, base, Path(tmp), spec.name, version)
                _publish(storage, spec.name, version, Path(tmp), built, base)
        except versions.RebaseError:
            log.info("%s: a change lost the race to another; building it again", spec.name)
            continue
        except KeyNotFoundError:
            # A file of the base went missing: pruned, so no longer current. Rebase, unless it is.
            if versions.read_current(storage, spec.name).tag == (base.pointer.tag if base else None):
                raise
            continue
        steps.published(storage, settings, spec.name, version)
        built.result.version, built.result.rebases = version, attempt
        return built.result
    raise ConflictError(f"{spec.name} changed {MAX_REBASES} times while this change was built; send it again")


def _build(change: Change, base: Base | None, staging: Path, endpoint: str, version: str) -> Built:
    built = change.build(base, staging)
    served_by = (built.manifest.get("runtime") or {}).get("name")
    if base is not None and served_by == litert.RUNTIME and not (staging / litert.MODEL_FILE).exists():
        # A change that embeds nothing keeps the base's converted encoder, as it is.
        built.carried = {**base.carry(endpoint, [litert.MODEL_FILE]), **built.carried}
    built.manifest = {
        **built.manifest,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "base": base.pointer.version if base else None,
        "lineage": (base.manifest.get("lineage") or base.pointer.version) if base else version,
    }
    built.manifest.pop("files", None)
    return built


def _publish(
    storage: Storage, endpoint: str, version: str, staging: Path, built: Built, base: Base | None
) -> None:
    try:
        versions.publish(
            storage,
            endpoint,
            version,
            staging,
            built.manifest,
            base=base.pointer if base else versions.Pointer(None, None),
            carried=built.carried,
        )
    except BaseException:
        steps.discard(storage, endpoint, version)
        raise


def summary(catalog: Catalog) -> dict[str, Any]:
    """The manifest's counts and labels of a catalog (items, rows, next id, items per label)."""
    live = catalog.live()
    labels = Counter(catalog.entries[r]["label"] for r in live if catalog.entries[r]["label"] is not None)
    return {**rows.manifest_summary(catalog), "labels": dict(sorted(labels.items()))}
