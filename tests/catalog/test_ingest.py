"""Training zips: labels from folders, metadata files, and what gets skipped (and why)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from service.catalog import ingest
from service.core.errors import NotAZipError, PayloadTooLargeError, TrainingError
from tests.helpers import make_zip

LIMITS = ingest.ZipLimits(max_entries=1000, max_uncompressed_bytes=10_000_000)


def plan_of(tmp_path: Path, files: dict[str, bytes], limits: ingest.ZipLimits = LIMITS) -> ingest.ZipPlan:
    path = tmp_path / "upload.zip"
    path.write_bytes(make_zip(files))
    with ingest.open_zip(path) as zf:
        return ingest.plan(zf, limits)


def test_labels_are_parent_folders_at_any_depth(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, {"a.jpg": b"1", "shoes/b.jpg": b"2", "shop/shirts/c.png": b"3"})
    assert [(e.name, e.label) for e in plan.entries] == [
        ("a.jpg", None),
        ("shoes/b.jpg", "shoes"),
        ("shop/shirts/c.png", "shirts"),
    ]


def test_clutter_is_ignored_and_unsafe_paths_are_skipped(tmp_path: Path) -> None:
    plan = plan_of(
        tmp_path,
        {
            "__MACOSX/shoes/._b.jpg": b"x",
            "shoes/.DS_Store": b"x",
            "shoes/b.jpg": b"2",
            "../evil.jpg": b"x",
            "/abs.jpg": b"x",
        },
    )
    assert [e.name for e in plan.entries] == ["shoes/b.jpg"]
    assert {s.reason for s in plan.skipped} == {"unsafe path"}


def test_metadata_csv_maps_filenames_to_fields(tmp_path: Path) -> None:
    csv = "filename,price,colour\nshoes/b.jpg,20,red\nc.jpg,5,blue\nmissing.jpg,1,x\n"
    plan = plan_of(tmp_path, {"shoes/b.jpg": b"2", "shirts/c.jpg": b"3", "metadata.csv": csv.encode()})
    assert plan.metadata_file == "metadata.csv"
    assert plan.metadata == {
        "shoes/b.jpg": {"price": "20", "colour": "red"},
        "shirts/c.jpg": {"price": "5", "colour": "blue"},
    }  # by unique basename
    assert plan.metadata_unmatched == 1
    assert "metadata.csv" not in [e.name for e in plan.entries]


def test_metadata_jsonl_keeps_json_types(tmp_path: Path) -> None:
    lines = [{"filename": "b.jpg", "price": 19.5, "tags": ["new"]}]
    plan = plan_of(
        tmp_path, {"b.jpg": b"2", "metadata.jsonl": "\n".join(json.dumps(x) for x in lines).encode()}
    )
    assert plan.metadata == {"b.jpg": {"price": 19.5, "tags": ["new"]}}


def test_a_zipped_folder_is_read_from_inside_its_top_folder(tmp_path: Path) -> None:
    csv = "filename,sku\nshoes/b.jpg,S1\n"
    plan = plan_of(tmp_path, {"catalog/shoes/b.jpg": b"2", "catalog/metadata.csv": csv.encode()})
    assert plan.metadata == {"catalog/shoes/b.jpg": {"sku": "S1"}}
    assert plan.entries[0].label == "shoes"
    assert plan.metadata_file == "catalog/metadata.csv"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("metadata.csv", b"name,price\nb.jpg,1\n", "needs a header row with a 'filename' column"),
        ("metadata.jsonl", b'{"filename": "b.jpg"}\nnot json\n', "line 2: not valid JSON"),
        ("metadata.jsonl", b'["b.jpg"]\n', "line 1: needs an object with a 'filename'"),
        ("metadata.csv", b"\xff\xfe\x00bad", "could not be read as UTF-8"),
    ],
)
def test_a_broken_metadata_file_fails_clearly(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    with pytest.raises(TrainingError, match=message):
        plan_of(tmp_path, {"b.jpg": b"1", name: content})


def test_limits_on_entries_and_expanded_size(tmp_path: Path) -> None:
    files = {f"{i}.jpg": b"x" * 100 for i in range(5)}
    with pytest.raises(PayloadTooLargeError, match="5 entries, over the limit of 4"):
        plan_of(tmp_path, files, ingest.ZipLimits(4, 10_000))
    with pytest.raises(PayloadTooLargeError, match="expands to 500 bytes"):
        plan_of(tmp_path, files, ingest.ZipLimits(100, 499))


def test_something_that_is_not_a_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fake.zip"
    path.write_bytes(b"PK\x03\x04 but not really a zip")
    with pytest.raises(NotAZipError, match="not a valid zip"):
        ingest.open_zip(path)


def test_a_corrupt_entry_is_reported_not_raised_raw(tmp_path: Path) -> None:
    path = tmp_path / "crc.zip"
    path.write_bytes(make_zip({"a.jpg": b"hello world" * 10}))
    data = bytearray(path.read_bytes())
    data[data.index(b"hello world") + 3] ^= 0xFF  # flip a byte of the stored data: bad CRC
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as zf:
        entry = ingest.plan(zf, LIMITS).entries[0]
        with pytest.raises(TrainingError, match="could not be read from the zip"):
            ingest.read_entry(zf, entry)


def test_a_single_top_folder_does_not_count_as_a_label(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, {"photos/0.jpg": b"1", "photos/shoes/1.jpg": b"2"})
    assert [(e.name, e.label) for e in plan.entries] == [
        ("photos/0.jpg", None),
        ("photos/shoes/1.jpg", "shoes"),
    ]


def test_an_entry_over_the_per_image_limit_is_skipped_unread(tmp_path: Path) -> None:
    limits = ingest.ZipLimits(1000, 10_000_000, max_entry_bytes=100)
    plan = plan_of(tmp_path, {"a/big.jpg": b"x" * 101, "a/ok.jpg": b"x" * 100}, limits)
    assert [e.name for e in plan.entries] == ["a/ok.jpg"]
    assert plan.skipped == [ingest.Skipped("a/big.jpg", "101 bytes, over the limit of 100 per image")]


def test_an_entry_with_an_empty_name_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "odd.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(zipfile.ZipInfo(""), b"nameless")
        zf.writestr("a/b.jpg", b"1")
    with ingest.open_zip(path) as zf:
        assert [e.name for e in ingest.plan(zf, LIMITS).entries] == ["a/b.jpg"]


def test_a_zip_needing_a_newer_format_is_not_a_zip(tmp_path: Path) -> None:
    data = bytearray(make_zip({"a.jpg": b"1"}))
    central = data.index(b"PK\x01\x02")
    data[central + 6] = 99  # "version needed to extract": 9.9
    path = tmp_path / "future.zip"
    path.write_bytes(bytes(data))
    with pytest.raises(NotAZipError, match="not a valid zip"):
        ingest.open_zip(path)


def test_a_zip_of_one_label_folder_keeps_that_label(tmp_path: Path) -> None:
    plan = plan_of(
        tmp_path,
        {
            "shoes/1.jpg": b"1",
            "shoes/2.jpg": b"2",
            "__MACOSX/shoes/._1.jpg": b"x",
            "shoes/metadata.csv": b"filename,sku\n1.jpg,S1\n",
        },
    )
    assert [(e.name, e.label) for e in plan.entries] == [("shoes/1.jpg", "shoes"), ("shoes/2.jpg", "shoes")]
    assert plan.metadata == {"shoes/1.jpg": {"sku": "S1"}}


def test_a_metadata_file_over_the_entry_limit_is_refused_unread(tmp_path: Path) -> None:
    limits = ingest.ZipLimits(1000, 10_000_000, max_entry_bytes=100)
    with pytest.raises(TrainingError, match="metadata.csv is 201 bytes, over the limit of 100"):
        plan_of(tmp_path, {"a.jpg": b"1", "metadata.csv": b"filename,x\n" + b"a" * 190}, limits)


def test_absurdly_nested_json_metadata_is_a_clear_error(tmp_path: Path) -> None:
    deep = b'{"filename": "a.jpg", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(TrainingError, match="line 1: not valid JSON"):
        plan_of(tmp_path, {"a.jpg": b"1", "metadata.jsonl": deep})
