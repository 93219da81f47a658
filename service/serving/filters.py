"""Filters on a query: `label=` and `where=` parsed into a `Filter`, evaluated over a version's rows.

    where = {"colour": "red"}                 metadata colour equals "red" (JSON equality: 1 == 1.0,
                                              but "1" != 1 and true != 1)
    where = {"colour": ["red", "blue"]}       any of those values
    where = {"price": {"min": 10, "max": 50}} a number in [10, 50] (either bound may be left out);
                                              strings holding a number count (CSV metadata is text),
                                              booleans do not
    label = ["shoes", "boots"]                the item's label is any of those

Conditions on several fields all apply (and); an item without the field never matches. Evaluating
a filter gives a boolean mask over the version's rows, from columns built on first use (the fields
a query names that are not built yet, in one pass over the memory-mapped metadata) and kept for
the segment's life within a memory budget.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from service.core.errors import InvalidParameterError, shorten
from service.core.names import label_problem

MAX_WHERE_CHARS = 4096
MAX_FIELDS = 50
MAX_VALUES = 100  # per list, and labels per query
MAX_FIELD_CHARS = 200  # a field name
MAX_COLUMN_BYTES = 256 * 1024 * 1024  # a segment's filter columns, at most (per process)
RANGE_KEYS = ("min", "max")

FieldPath = tuple[str, ...]  # ("label",) or ("metadata", field)


class Rows(Protocol):
    """A version's row entries ({"label", "metadata", ...}) by row number (a JsonLinesMap)."""

    def __len__(self) -> int: ...

    def __getitem__(self, row: int) -> Any: ...


@dataclass(frozen=True)
class AnyOf:
    """The value at `path` is one of `values` (each as its `value_key`)."""

    path: FieldPath
    values: frozenset[Key]


@dataclass(frozen=True)
class Range:
    """The value at `path` is a number within [low, high]; None leaves that side open."""

    path: FieldPath
    low: float | None
    high: float | None


@dataclass(frozen=True)
class Filter:
    """Every condition must hold (and); within an `AnyOf`, any of its values."""

    conditions: tuple[AnyOf | Range, ...]


def canonical(value: Any) -> str:
    """A value's JSON text with integral floats written as integers, so 1 and 1.0 compare equal."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


Key = str | tuple[Any, ...]


def value_key(value: Any) -> Key:
    """What a value is compared by, cheaply (a filter's columns key every row's value): a string as
    itself; a number as ("n", number), so 1 and 1.0 are one key; a boolean as ("b", it), never
    equal to 1; null as ("z",); a list or object as its canonical JSON."""
    kind = type(value)
    if kind is str:
        return value
    if kind is bool:
        return ("b", value)
    if kind is int or kind is float:
        return ("n", value)
    if value is None:
        return ("z",)
    return ("j", canonical(value))


def _problem(name: str, message: str) -> InvalidParameterError:
    return InvalidParameterError(f"invalid {name} filter: {message}", errors={name: [message]})


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer past a double's range
        return False


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | bool | int | float)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_filter(labels: list[str] | None, where: str | dict[str, Any] | None) -> Filter | None:
    """The filter a query asked for, or None for none; InvalidParameterError naming the problem."""
    conditions: list[AnyOf | Range] = []
    if labels:
        if len(labels) > MAX_VALUES:
            raise _problem("label", f"at most {MAX_VALUES} labels, got {len(labels)}")
        for label in labels:
            problem = label_problem(label) if isinstance(label, str) else "a label is a string"
            if problem:
                raise _problem("label", problem)
        conditions.append(AnyOf(("label",), frozenset(value_key(label) for label in labels)))
    if where is not None:
        conditions.extend(_parse_where(where))
    return Filter(tuple(conditions)) if conditions else None


def _parse_where(where: str | dict[str, Any]) -> list[AnyOf | Range]:
    if isinstance(where, str):
        if len(where) > MAX_WHERE_CHARS:
            raise _problem("where", f"at most {MAX_WHERE_CHARS} characters, got {len(where)}")
        try:
            where = json.loads(where, parse_constant=_reject_constant)
        except RecursionError:
            raise _problem("where", "nested too deeply") from None
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise _problem("where", f"not valid JSON ({exc})") from None
    if not isinstance(where, dict):
        raise _problem("where", f"must be a JSON object of field -> condition, not {type(where).__name__}")
    if len(where) > MAX_FIELDS:
        raise _problem("where", f"at most {MAX_FIELDS} fields, got {len(where)}")
    return [_condition(name, value) for name, value in where.items()]


def _condition(name: str, value: Any) -> AnyOf | Range:
    if not name or len(name) > MAX_FIELD_CHARS:
        raise _problem("where", f"a field name must have 1 to {MAX_FIELD_CHARS} characters")
    path = ("metadata", name)
    if isinstance(value, dict):
        return _range(name, path, value)
    if isinstance(value, list):
        if not value:
            raise _problem("where", f"{name!r}: an empty list matches nothing")
        if len(value) > MAX_VALUES:
            raise _problem("where", f"{name!r}: at most {MAX_VALUES} values, got {len(value)}")
        if not all(_is_scalar(v) for v in value):
            raise _problem("where", f"{name!r}: list values must be strings, numbers, booleans or null")
        return AnyOf(path, frozenset(value_key(v) for v in value))
    if not _is_scalar(value):  # pragma: no cover - JSON has no other types
        raise _problem("where", f"{name!r}: unsupported value")
    return AnyOf(path, frozenset((value_key(value),)))


def _range(name: str, path: FieldPath, value: dict[str, Any]) -> Range:
    unknown = sorted(set(value) - set(RANGE_KEYS))
    if unknown:
        raise _problem("where", f"{name!r}: unknown range key(s) {unknown}; a range takes 'min' and/or 'max'")
    if not value:
        raise _problem("where", f"{name!r}: a range needs 'min' and/or 'max'")
    for key in RANGE_KEYS:
        if key in value and not _is_number(value[key]):
            got = shorten(json.dumps(value[key]))
            raise _problem("where", f"{name!r}: {key} must be a number, got {got}")
        if key in value and not _finite(value[key]):
            raise _problem("where", f"{name!r}: {key} is beyond the range of a double (about 1.8e308)")
    low, high = value.get("min"), value.get("max")
    if low is not None and high is not None and low > high:
        raise _problem("where", f"{name!r}: min {low} is greater than max {high}")
    return Range(path, None if low is None else float(low), None if high is None else float(high))


# --- evaluation ---------------------------------------------------------------------------------


def _value(item: dict[str, Any], path: FieldPath) -> Any:
    if path == ("label",):
        return item.get("label")
    metadata = item.get("metadata") or {}
    return metadata.get(path[1], _MISSING)


_MISSING = object()


def _as_number(value: Any) -> float:
    if _is_number(value) or isinstance(value, str):
        try:
            return float(value)  # NaN and infinities parse too; NaN never matches a range
        except (ValueError, OverflowError):  # not a number; an integer stored before 422s existed
            pass
    return math.nan


@dataclass(frozen=True)
class Codes:
    """One field's column: each row's value code (-1: missing), each code's value as a number (NaN:
    not one) and each value's code, keyed by `value_key`."""

    codes: np.ndarray
    vocabulary: dict[Key, int]
    numbers: np.ndarray

    vocabulary_bytes: int = 0  # the vocabulary's keys and entries, roughly (sys.getsizeof)

    def nbytes(self) -> int:
        return self.codes.nbytes + self.numbers.nbytes + self.vocabulary_bytes


class ColumnCache:
    """A segment's filter columns, each built once (the missing ones of a query in one pass over the
    rows) and kept for the version's life within `max_bytes`: a query naming fields already built
    reads nothing, and cycling through fields costs one pass per field, ever. The first pass also
    records which fields any row has, so a field no row has costs nothing. A field whose column
    would pass the budget is a 422, never a pass per query. Thread-safe."""

    def __init__(self, max_bytes: int = MAX_COLUMN_BYTES) -> None:
        self.max_bytes = max_bytes
        self._columns: dict[FieldPath, Codes] = {}
        self._present: set[FieldPath] | None = None  # every field some row has, once known
        self._spent = 0
        self._lock = threading.Lock()

    def columns(self, paths: list[FieldPath], items: Rows) -> list[Codes | None]:
        """The column of each path (None: no row has that field)."""
        with self._lock:
            wanted = [
                path
                for path in dict.fromkeys(paths)
                if path not in self._columns and (self._present is None or path in self._present)
            ]
            if wanted:
                if self._spent + 4 * len(items) * len(wanted) > self.max_bytes:
                    raise _over_budget(len(wanted), self.max_bytes)
                budget = self.max_bytes - self._spent
                built, present = _build(wanted, items, self._present is None, budget)
                if present is not None:
                    self._present = present
                self._columns.update(built)
                self._spent += sum(column.nbytes() for column in built.values())
            return [self._columns.get(path) for path in paths]

    def __len__(self) -> int:
        return len(self._columns)


def _over_budget(fields: int, budget: int) -> InvalidParameterError:
    return _problem(
        "where",
        f"{fields} more field(s) to filter on would pass this version's memory for filter columns "
        f"({budget // (1024 * 1024)} MB left); filter on fields used before",
    )


def _build(
    paths: list[FieldPath], items: Rows, find_present: bool, budget: int
) -> tuple[dict[FieldPath, Codes], set[FieldPath] | None]:
    """The columns of `paths` in one pass over the rows; with `find_present`, also every field some
    row has. A 422 as soon as they would hold more than `budget` bytes (distinct values count by
    their size: long unique strings fill it fast)."""
    count = len(items)
    names = [None if path == ("label",) else path[1] for path in paths]
    columns: list[list[int]] = [[] for _ in paths]
    vocabularies: list[dict[Key, int]] = [{} for _ in paths]
    raw: list[list[Any]] = [[] for _ in paths]
    fields: set[str] = set()
    labelled = False
    spent = 4 * count * len(paths)
    vocabulary_bytes = [0] * len(paths)
    for row in range(count):
        item = items[row]
        metadata = item.get("metadata") or {}
        if find_present:
            fields.update(metadata)
            labelled = labelled or "label" in item
        for i, name in enumerate(names):
            value = item.get("label", _MISSING) if name is None else metadata.get(name, _MISSING)
            if value is _MISSING:
                columns[i].append(-1)
                continue
            key = value_key(value)
            code = vocabularies[i].get(key)
            if code is None:
                code = vocabularies[i][key] = len(vocabularies[i])
                raw[i].append(value)
                size = sys.getsizeof(key) + 100  # the key, and its dict and list entries
                vocabulary_bytes[i] += size
                spent += size
                if spent > budget:
                    raise _over_budget(len(paths), budget)
            columns[i].append(code)
    built = {
        path: Codes(
            np.array(columns[i], dtype=np.int32),
            vocabularies[i],
            np.array([_as_number(v) for v in raw[i]] + [math.nan]),
            vocabulary_bytes[i],
        )
        for i, path in enumerate(paths)
    }
    present: set[FieldPath] | None = None
    if find_present:
        present = {("metadata", name) for name in fields}
        if labelled:
            present.add(("label",))
    return built, present


def evaluate(flt: Filter, items: Rows, cache: ColumnCache) -> np.ndarray:
    """The rows the filter keeps: a new boolean array of len(items) (the caller may change it)."""
    mask = np.ones(len(items), dtype=bool)
    columns = cache.columns([condition.path for condition in flt.conditions], items)
    for condition, column in zip(flt.conditions, columns, strict=True):
        if column is None:  # no row has the field: nothing matches
            mask[:] = False
            continue
        if isinstance(condition, AnyOf):
            # A lookup table over the codes; its last entry (code -1: missing) stays False.
            table = np.zeros(len(column.vocabulary) + 1, dtype=bool)
            wanted = [column.vocabulary[v] for v in condition.values if v in column.vocabulary]
            table[wanted] = True
            mask &= table[column.codes]
        else:
            numbers = column.numbers[column.codes]  # code -1 reads the last entry: NaN
            if condition.low is not None:
                mask &= numbers >= condition.low
            if condition.high is not None:
                mask &= numbers <= condition.high
    return mask


def matches(flt: Filter, entry: dict[str, Any]) -> bool:
    """Whether one entry passes the filter (the rows a version edited are judged one by one)."""
    for condition in flt.conditions:
        value = _value(entry, condition.path)
        if isinstance(condition, AnyOf):
            if value is _MISSING or value_key(value) not in condition.values:
                return False
            continue
        number = _as_number(value) if value is not _MISSING else math.nan
        if math.isnan(number):
            return False
        if condition.low is not None and number < condition.low:
            return False
        if condition.high is not None and number > condition.high:
            return False
    return True
