"""Filters on a query: `label=` and `where=` parsed into a `Filter`, evaluated over a version's rows.

    where = {"colour": "red"}                 metadata colour equals "red" (JSON equality: 1 == 1.0,
                                              but "1" != 1 and true != 1)
    where = {"colour": ["red", "blue"]}       any of those values
    where = {"price": {"min": 10, "max": 50}} a number in [10, 50] (either bound may be left out);
                                              strings holding a number count (CSV metadata is text),
                                              booleans do not
    label = ["shoes", "boots"]                the item's label is any of those

Conditions on several fields all apply (and); an item without the field never matches. Evaluating
a filter gives a boolean mask over the version's rows, from columns built on first use (one pass
over the memory-mapped metadata per new field) and kept per loaded version.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from service.core import names
from service.core.errors import InvalidParameterError

MAX_WHERE_CHARS = 4096
MAX_FIELDS = 50
MAX_VALUES = 100  # per list, and labels per query
MAX_NAME_CHARS = 200  # a field name
MAX_COLUMNS = 16  # columns kept per loaded version (least recently used dropped first)
RANGE_KEYS = ("min", "max")

FieldPath = tuple[str, ...]  # ("label",) or ("metadata", field)


class Rows(Protocol):
    """A version's row entries ({"label", "metadata", ...}) by row number (a JsonLinesMap)."""

    def __len__(self) -> int: ...

    def __getitem__(self, row: int) -> Any: ...


@dataclass(frozen=True)
class AnyOf:
    """The value at `path` is one of `values` (each in canonical JSON, see `canonical`)."""

    path: FieldPath
    values: frozenset[str]


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


def _problem(name: str, message: str) -> InvalidParameterError:
    return InvalidParameterError(f"invalid {name} filter: {message}", errors={name: [message]})


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer past a double's range
        return False


def _shown(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


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
            problem = names.label_problem(label) if isinstance(label, str) else "a label is a string"
            if problem:
                raise _problem("label", problem)
        conditions.append(AnyOf(("label",), frozenset(canonical(label) for label in labels)))
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
    if not name or len(name) > MAX_NAME_CHARS:
        raise _problem("where", f"a field name must have 1 to {MAX_NAME_CHARS} characters")
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
        return AnyOf(path, frozenset(canonical(v) for v in value))
    if not _is_scalar(value):  # pragma: no cover - JSON has no other types
        raise _problem("where", f"{name!r}: unsupported value")
    return AnyOf(path, frozenset((canonical(value),)))


def _range(name: str, path: FieldPath, value: dict[str, Any]) -> Range:
    unknown = sorted(set(value) - set(RANGE_KEYS))
    if unknown:
        raise _problem("where", f"{name!r}: unknown range key(s) {unknown}; a range takes 'min' and/or 'max'")
    if not value:
        raise _problem("where", f"{name!r}: a range needs 'min' and/or 'max'")
    for key in RANGE_KEYS:
        if key in value and not _is_number(value[key]):
            raise _problem("where", f"{name!r}: {key} must be a number, got {_shown(value[key])}")
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
    """A column of value codes (-1: missing) and each value's code, keyed by canonical JSON."""

    codes: np.ndarray
    vocabulary: dict[str, int]


class ColumnCache:
    """One loaded version's filter columns, built on first use; safe to share between threads."""

    def __init__(self, max_columns: int = MAX_COLUMNS) -> None:
        self.max_columns = max_columns
        self._columns: OrderedDict[tuple[str, FieldPath], Codes | np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def columns(self, keys: list[tuple[str, FieldPath]], items: Rows) -> list[Codes | np.ndarray]:
        """The columns for `keys` (("codes" | "numbers", path)); the missing ones are built in one
        pass over `items`."""
        with self._lock:
            missing = [key for key in dict.fromkeys(keys) if key not in self._columns]
            if missing:
                self._columns.update(_build(missing, items))
            found = []
            for key in keys:
                self._columns.move_to_end(key)
                found.append(self._columns[key])
            while len(self._columns) > max(self.max_columns, len(set(keys))):
                self._columns.popitem(last=False)
            return found

    def __len__(self) -> int:
        return len(self._columns)


def _build(keys: list[tuple[str, FieldPath]], items: Rows) -> dict[tuple[str, FieldPath], Codes | np.ndarray]:
    count = len(items)
    codes = {key: np.full(count, -1, dtype=np.int32) for key in keys if key[0] == "codes"}
    vocabularies: dict[tuple[str, FieldPath], dict[str, int]] = {key: {} for key in codes}
    numbers = {key: np.full(count, np.nan) for key in keys if key[0] == "numbers"}
    for row in range(count):
        item = items[row]
        for key, column in codes.items():
            value = _value(item, key[1])
            if value is not _MISSING:
                vocabulary = vocabularies[key]
                column[row] = vocabulary.setdefault(canonical(value), len(vocabulary))
        for key, column in numbers.items():
            column[row] = _as_number(_value(item, key[1]))
    built: dict[tuple[str, FieldPath], Codes | np.ndarray] = dict(numbers)
    built.update({key: Codes(column, vocabularies[key]) for key, column in codes.items()})
    return built


def evaluate(flt: Filter, items: Rows, cache: ColumnCache) -> np.ndarray:
    """The rows the filter keeps: a new boolean array of len(items) (the caller may change it)."""
    keys = [("codes" if isinstance(c, AnyOf) else "numbers", c.path) for c in flt.conditions]
    mask = np.ones(len(items), dtype=bool)
    for condition, column in zip(flt.conditions, cache.columns(keys, items), strict=True):
        if isinstance(condition, AnyOf):
            assert isinstance(column, Codes)
            # A lookup table over the codes; its last entry (code -1: missing) stays False.
            table = np.zeros(len(column.vocabulary) + 1, dtype=bool)
            wanted = [column.vocabulary[v] for v in condition.values if v in column.vocabulary]
            table[wanted] = True
            mask &= table[column.codes]
        else:
            assert isinstance(column, np.ndarray)
            if condition.low is not None:
                mask &= column >= condition.low
            if condition.high is not None:
                mask &= column <= condition.high
    return mask


def matches(flt: Filter, entry: dict[str, Any]) -> bool:
    """Whether one entry passes the filter (the rows a version edited are judged one by one)."""
    for condition in flt.conditions:
        value = _value(entry, condition.path)
        if isinstance(condition, AnyOf):
            if value is _MISSING or canonical(value) not in condition.values:
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
