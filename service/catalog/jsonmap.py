"""id -> value JSON objects written one entry per line, so a worker can read a single entry
from a memory-mapped file instead of holding a million parsed entries in every process.

    {
    "0": "shoes/red-1.jpg",
    "1": "shoes/red-2.jpg"
    }

The file stays ordinary JSON for anyone else who reads it.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from service.core.errors import IntegrityError


def write(path: Path, values: Iterable[Any]) -> None:
    """Write values[0..n-1] as {"0": ..., "1": ...}, one entry per line."""
    with path.open("w", encoding="utf-8") as f:
        f.write("{")
        for i, value in enumerate(values):
            f.write(("\n" if i == 0 else ",\n") + f'"{i}": ' + json.dumps(value, ensure_ascii=False))
        f.write("\n}\n")


class JsonLinesMap:
    """Read-only access to such a file by integer id; pages are shared between processes."""

    def __init__(self, path: Path, count: int) -> None:
        self.path = path
        self.count = count
        with path.open("rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
        ends = np.flatnonzero(np.frombuffer(self._map, dtype=np.uint8) == ord("\n"))
        self._parsed: dict[str, Any] | None = None
        if len(ends) == count + 2:  # "{", one line per entry, "}"
            self._starts, self._ends = ends[:-2] + 1, ends[1:-1]
        else:  # written some other way (e.g. by hand): parse it once, the slow way
            self._parsed = json.loads(bytes(self._map))
            if len(self._parsed) != count:
                raise IntegrityError(
                    f"{path.name} has {len(self._parsed)} entries, the manifest says {count}"
                )

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self.count:
            raise IndexError(i)
        if self._parsed is not None:
            return self._parsed[str(i)]
        line = self._map[self._starts[i] : self._ends[i]].rstrip(b",")
        key, _, value = line.partition(b": ")
        if key != f'"{i}"'.encode():
            raise IntegrityError(f"{self.path.name}: line {i + 2} holds {key!r}, expected id {i}")
        return json.loads(value)

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(self.count))
