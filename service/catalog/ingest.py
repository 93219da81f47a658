"""Training zips: which entries are images, their labels (parent folder) and metadata (optional file)."""

from __future__ import annotations

import csv
import io
import json
import posixpath
import stat
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from service.core.config import Settings
from service.core.errors import InvalidParameterError, NotAZipError, PayloadTooLargeError, TrainingError
from service.core.names import check_label, check_name, name_problem

METADATA_FILES = ("metadata.csv", "metadata.jsonl")
NESTED_ARCHIVES = (".zip", ".tar", ".gz", ".tgz", ".7z", ".rar", ".bz2", ".xz")


@dataclass(frozen=True)
class Entry:
    """One candidate image in the zip."""

    name: str  # the path inside the zip: the item's name
    label: str | None  # its parent folder, None at the root
    info: zipfile.ZipInfo


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


@dataclass
class ZipPlan:
    entries: list[Entry] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # entry name -> fields
    metadata_file: str | None = None
    metadata_unmatched: int = 0


@dataclass(frozen=True)
class ZipLimits:
    max_entries: int
    max_uncompressed_bytes: int
    max_entry_bytes: int = 1 << 62  # per image
    max_ratio: float = 100.0  # expanded / compressed, per entry: more is a zip bomb
    max_photos_per_item: int = 50

    @classmethod
    def from_settings(cls, settings: Settings) -> ZipLimits:
        mb = 1024 * 1024
        return cls(
            settings.max_zip_entries,
            settings.max_zip_uncompressed_mb * mb,
            settings.max_image_mb * mb,
            settings.max_zip_ratio,
            settings.max_photos_per_item,
        )


# Below this many expanded bytes, a zip's overall ratio is not checked (a few text files compress well).
AGGREGATE_RATIO_FLOOR = 10_000_000


def open_zip(path: Path | IO[bytes]) -> zipfile.ZipFile:
    """Open an uploaded zip (a path, or a seekable file), or raise NotAZipError (422) for anything else."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        # NotImplementedError: a zip that needs a newer format version than Python reads.
        raise NotAZipError(f"the uploaded file is not a valid zip archive ({exc})") from None


def check_limits(zf: zipfile.ZipFile, limits: ZipLimits) -> None:
    """Refuse (413) a zip with too many entries, that expands too far, or that expands too much for
    its size (a zip bomb), from its directory alone, before anything is inflated."""
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise PayloadTooLargeError(
            f"the zip has {len(infos)} entries, over the limit of {limits.max_entries}"
        )
    total = sum(i.file_size for i in infos)
    if total > limits.max_uncompressed_bytes:
        raise PayloadTooLargeError(
            f"the zip expands to {total} bytes, over the limit of {limits.max_uncompressed_bytes}"
        )
    packed = sum(i.compress_size for i in infos)
    if total > AGGREGATE_RATIO_FLOOR and total > limits.max_ratio * max(packed, 1):
        # Many entries each under the per-entry floor can still add up to a bomb.
        raise PayloadTooLargeError(
            f"the zip expands {total / max(packed, 1):.0f} times in all (limit {limits.max_ratio:.0f}): "
            "a zip bomb is not unpacked"
        )
    for info in infos:
        # Images barely compress; thousandfold ratios are built to fill a disk. (zipfile stops
        # inflating at the declared size, so the directory's figures bound what we would write.)
        if info.file_size > 1_000_000 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise PayloadTooLargeError(
                f"{info.filename!r} expands {info.file_size / max(info.compress_size, 1):.0f} times "
                f"(limit {limits.max_ratio:.0f}): a zip bomb is not unpacked"
            )


def plan(zf: zipfile.ZipFile, limits: ZipLimits) -> ZipPlan:
    """Sort the zip's entries into candidate images and skipped files; read the metadata file."""
    check_limits(zf, limits)
    infos = zf.infolist()
    result = ZipPlan()
    names = [i.filename for i in infos if i.filename and not i.is_dir() and not _clutter(i.filename)]
    root = _common_root(names)
    # A zipped catalog folder holds label folders; a zip of one label folder holds only images.
    label_root = root if any(n.count("/") >= 2 for n in names) else ""
    seen: set[str] = set()
    metadata_info: zipfile.ZipInfo | None = None
    for info in sorted(infos, key=lambda i: i.filename):
        name = info.filename
        if not name or info.is_dir():
            continue
        parts = name.split("/")
        if name.startswith("/") or ".." in parts or "\\" in name:
            result.skipped.append(Skipped(name, "unsafe path"))
        elif _clutter(name):
            continue
        elif name in seen:
            result.skipped.append(Skipped(name, "duplicate name in the zip"))
        elif name[len(root) :] in METADATA_FILES and metadata_info is None:
            metadata_info = info
        elif info.flag_bits & 0x1:
            result.skipped.append(Skipped(name, "encrypted entry"))
        elif stat.S_ISLNK(info.external_attr >> 16):
            result.skipped.append(Skipped(name, "symbolic link (links are never followed)"))
        elif name.lower().endswith(NESTED_ARCHIVES):
            result.skipped.append(Skipped(name, "an archive inside the zip (nested archives are not read)"))
        elif info.file_size > limits.max_entry_bytes:
            # Checked before reading: zipfile never inflates an entry past its declared size.
            result.skipped.append(
                Skipped(name, f"{info.file_size} bytes, over the limit of {limits.max_entry_bytes} per image")
            )
        elif problem := name_problem(name):
            result.skipped.append(Skipped(name, f"not a usable name: {problem}"))
        else:
            inner = name[len(label_root) :].split("/")  # labels count from inside a zipped folder
            result.entries.append(Entry(name, inner[-2] if len(inner) > 1 else None, info))
        seen.add(name)

    if metadata_info is not None:
        if metadata_info.file_size > limits.max_entry_bytes:
            raise TrainingError(
                f"{metadata_info.filename} is {metadata_info.file_size} bytes, over the limit of "
                f"{limits.max_entry_bytes}"
            )
        result.metadata_file = metadata_info.filename
        rows = _read_metadata(zf, metadata_info)
        result.metadata, result.metadata_unmatched = _match_metadata(
            rows, [e.name for e in result.entries], root
        )
        _check_items(result, limits.max_photos_per_item)
    return result


def _check_items(plan: ZipPlan, max_photos: int) -> None:
    """The metadata's `item` column groups photos into items: at most `max_photos` each, and never
    under another image's own name (that would merge two items without a word)."""

    def item_of(name: str) -> str | None:
        item = plan.metadata.get(name, {}).get("item")
        return None if item in (None, "") else str(item)

    images = {entry.name for entry in plan.entries}
    photos: Counter[str] = Counter()
    for entry in plan.entries:
        item = item_of(entry.name)
        if item is None:
            continue
        # Another image's name is an item only if that image says so itself.
        if item in images and item != entry.name and item_of(item) != item:
            raise TrainingError(
                f"{entry.name}: its item {item!r} is the name of an image of another item; "
                "give the image the same item, or name the item apart"
            )
        photos[item] += 1
    for item, count in photos.most_common(1):
        if count > max_photos:
            raise TrainingError(
                f"item {item!r} has {count} photos, over the limit of {max_photos} (MAX_PHOTOS_PER_ITEM)"
            )


def _clutter(name: str) -> bool:
    """Archiver and OS files (__MACOSX/, .DS_Store, ._x.jpg), not the user's."""
    parts = name.split("/")
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def _common_root(names: list[str]) -> str:
    """'catalog/' when every file sits in one top-level folder (zipping a folder does that)."""
    tops = {n.split("/")[0] for n in names if "/" in n}
    if len(tops) == 1 and all("/" in n for n in names):
        return tops.pop() + "/"
    return ""


def _read_metadata(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> list[dict[str, Any]]:
    name = info.filename
    try:
        text = _read(zf, info).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TrainingError(f"{name}: could not be read as UTF-8 text ({exc})") from None
    except TrainingError as exc:
        raise TrainingError(f"{name}: {exc.message}") from None
    rows: list[dict[str, Any]] = []
    if name.endswith(".csv"):
        try:
            reader = csv.DictReader(io.StringIO(text))
            rows = [dict(row) for row in reader]
        except csv.Error as exc:
            raise TrainingError(f"{name}: not valid CSV ({exc})") from None
        if reader.fieldnames is None or "filename" not in reader.fieldnames:
            raise TrainingError(f"{name}: needs a header row with a 'filename' column")
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line, parse_constant=_not_json)
            except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
                raise TrainingError(
                    f"{name} line {number}: not valid JSON (NaN and Infinity are not JSON either)"
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get("filename"), str):
                raise TrainingError(f"{name} line {number}: needs an object with a 'filename'")
            rows.append(row)
    for number, row in enumerate(rows, start=1):
        try:
            check_metadata(row)
        except InvalidParameterError as exc:
            raise TrainingError(f"{name} row {number}: {exc.message}") from None
    return rows


def _match_metadata(
    rows: list[dict[str, Any]], names: list[str], root: str
) -> tuple[dict[str, dict[str, Any]], int]:
    """Map each row to an entry: by path (relative to the metadata file), else by unique basename."""
    by_path = set(names)
    by_base: dict[str, list[str]] = {}
    for n in names:
        by_base.setdefault(posixpath.basename(n), []).append(n)
    matched: dict[str, dict[str, Any]] = {}
    unmatched = 0
    for row in rows:
        filename = str(row.get("filename") or "").strip().removeprefix("./")
        fields = {k: v for k, v in row.items() if k != "filename" and k is not None}
        candidates = [c for c in (root + filename, filename) if c in by_path]
        if not candidates and len(by_base.get(filename, [])) == 1:
            candidates = by_base[filename]
        if candidates:
            matched[candidates[0]] = fields
        else:
            unmatched += 1
    return matched, unmatched


class Members(Protocol):
    """What reads an entry's bytes: a ZipFile, or a MemberReader (catalog/members.py)."""

    def read(self, info: zipfile.ZipInfo, /) -> bytes: ...


def read_entry(zf: Members, entry: Entry) -> bytes:
    """The entry's bytes, or TrainingError with the reason (bad CRC, unsupported method...)."""
    return _read(zf, entry.info)


def _read(zf: Members, info: zipfile.ZipInfo) -> bytes:
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError) as exc:
        raise TrainingError(f"could not be read from the zip: {exc}") from None
    except Exception as exc:  # zlib.error and lzma errors have no common base
        raise TrainingError(f"could not be read from the zip: {type(exc).__name__}") from None


def write_images_zip(
    path: Path,
    images: list[tuple[str, bytes]],
    label: str | None,
    metadata: dict[str, Any] | None,
    name: str | None = None,
) -> None:
    """A zip in the /train format from uploaded images: `label` as their folder, `metadata` for
    each in metadata.jsonl; `name` (one image only) is the item's name, its path in the zip."""
    if name is not None and len(images) != 1:
        raise InvalidParameterError("'name' names one image; send one image with it")
    if name is not None and label:
        raise InvalidParameterError(
            "send 'name' or 'label', not both: the label is the folder in the name (e.g. shoes/red-1.jpg)"
        )
    if label is not None:
        check_label(label)
    folder = f"{label}/" if label else ""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        rows = []
        for filename, data in images:
            if name is not None:
                entry = check_name(name)
            else:
                entry = folder + check_name(posixpath.basename(filename.replace("\\", "/")), "filename")
            if entry in zf.namelist():
                raise InvalidParameterError(f"two images are named {entry!r}; give them different file names")
            zf.writestr(entry, data)
            if metadata:
                rows.append(json.dumps({**metadata, "filename": entry}))
        if rows:
            zf.writestr("metadata.jsonl", "\n".join(rows) + "\n")


MAX_ITEM_METADATA_BYTES = 64 * 1024
MAX_METADATA_DEPTH = 16


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def _depth(value: Any) -> int:
    """How deeply `value` nests (iteratively: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        current, level = stack.pop()
        if isinstance(current, dict | list):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in (current.values() if isinstance(current, dict) else current))
    return deepest


def _huge_number(value: Any) -> int | None:
    """The first integer in `value` too large for a double (which filters compare), if any."""
    stack = [value]
    while stack:
        current = stack.pop()
        if isinstance(current, int) and not isinstance(current, bool) and abs(current) > sys.float_info.max:
            return current
        if isinstance(current, dict | list):
            stack.extend(current.values() if isinstance(current, dict) else current)
    return None


def check_metadata(metadata: dict[str, Any], field: str = "metadata") -> dict[str, Any]:
    """An item's metadata (a change's, or a row of a metadata file): standard JSON (no NaN or
    Infinity, which no JSON parser reads back, and no number beyond a double's range), nested at
    most 16 deep, at most 64 KB; or a 422 that says which."""
    if _depth(metadata) > MAX_METADATA_DEPTH:
        raise InvalidParameterError(
            f"'{field}' nests deeper than {MAX_METADATA_DEPTH} levels", errors={field: ["Too deep."]}
        )
    if _huge_number(metadata) is not None:
        raise InvalidParameterError(
            f"'{field}' holds a number beyond the range of a double (about 1.8e308)",
            errors={field: ["Number out of range."]},
        )
    try:
        size = len(json.dumps(metadata, allow_nan=False))
    except ValueError:
        raise InvalidParameterError(
            f"'{field}' holds NaN or Infinity, which JSON cannot carry", errors={field: ["Not finite."]}
        ) from None
    except RecursionError:
        raise InvalidParameterError(
            f"'{field}' is nested too deeply", errors={field: ["Too deep."]}
        ) from None
    if size > MAX_ITEM_METADATA_BYTES:
        raise InvalidParameterError(
            f"'{field}' is {size} bytes as JSON, over the limit of {MAX_ITEM_METADATA_BYTES}",
            errors={field: ["Too large."]},
        )
    return metadata
