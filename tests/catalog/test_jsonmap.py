"""Line-per-entry JSON maps: valid JSON for anyone, one entry readable without parsing the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.catalog.jsonmap import JsonLinesMap, write
from service.core.errors import IntegrityError

VALUES = ["shoes/a.jpg", {"label": "x", "metadata": {"note": 'line\nbreak, "quoted"'}}, None, 3.5, "ünï"]


def test_written_files_are_plain_json_objects(tmp_path: Path) -> None:
    write(tmp_path / "m.json", VALUES)
    assert json.loads((tmp_path / "m.json").read_text()) == {str(i): v for i, v in enumerate(VALUES)}


def test_entries_are_read_one_at_a_time(tmp_path: Path) -> None:
    write(tmp_path / "m.json", VALUES)
    mapped = JsonLinesMap(tmp_path / "m.json", len(VALUES))
    assert [mapped[i] for i in range(len(VALUES))] == VALUES
    assert list(mapped) == VALUES and len(mapped) == 5
    with pytest.raises(IndexError):
        mapped[5]


def test_compact_json_written_elsewhere_still_loads(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text(json.dumps({"0": "a", "1": "b"}))
    assert list(JsonLinesMap(tmp_path / "m.json", 2)) == ["a", "b"]
    with pytest.raises(IntegrityError, match="has 2 entries, the manifest says 3"):
        JsonLinesMap(tmp_path / "m.json", 3)


def test_an_empty_map(tmp_path: Path) -> None:
    write(tmp_path / "m.json", [])
    assert json.loads((tmp_path / "m.json").read_text()) == {}
    assert len(JsonLinesMap(tmp_path / "m.json", 0)) == 0
