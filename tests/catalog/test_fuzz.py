"""Fuzzing: property-based tests of zip and image ingest, and schemathesis against /openapi.json."""

from __future__ import annotations

import io
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.catalog import ingest
from service.catalog.images import prepare
from service.core.errors import ServiceError
from tests.helpers import make_zip

LIMITS = ingest.ZipLimits(max_entries=500, max_uncompressed_bytes=50_000_000, max_entry_bytes=5_000_000)
# CI: derandomized, the same examples on every run, so it is repeatable and a failure reproduces.
# FUZZ_DEEP=1 explores fresh random examples, many more of them (a local bug hunt).
DEEP = os.environ.get("FUZZ_DEEP") == "1"
FUZZ = settings(
    max_examples=5000 if DEEP else 300,
    deadline=None,
    derandomize=not DEEP,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (12, 9), (200, 30, 90)).save(out, format="PNG")
    return out.getvalue()


SEED_ZIP = make_zip({"a/one.png": _png(), "b/two.png": _png(), "metadata.csv": b"filename,x\na/one.png,1\n"})
SEED_IMAGE = _png()


def ingest_everything(data: bytes) -> None:
    """Everything /train does with a zip before the encoder; only ServiceErrors may come out."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.zip"
        path.write_bytes(data)
        try:
            with ingest.open_zip(path) as zf:
                ingest.check_limits(zf, LIMITS)
                plan = ingest.plan(zf, LIMITS)
                for entry in plan.entries:
                    try:
                        prepare(ingest.read_entry(zf, entry), 32, 1_000_000)
                    except ServiceError:
                        pass  # a skipped file, with its reason
        except ServiceError:
            pass  # a refused zip: 413 / 422 with a message


def mutate(seed: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(seed)
    for offset, value in edits:
        data[offset % len(data)] = value
    return bytes(data[:cut] if cut else data)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_as_a_zip_never_crash(data: bytes) -> None:
    ingest_everything(data)


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=12),
    st.one_of(st.none(), st.integers(1, len(SEED_ZIP))),
)
def test_mutated_zips_never_crash(edits: list[tuple[int, int]], cut: int | None) -> None:
    ingest_everything(mutate(SEED_ZIP, edits, cut))


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    st.one_of(st.none(), st.integers(1, len(SEED_IMAGE))),
)
def test_mutated_images_only_ever_fail_as_bad_images(edits: list[tuple[int, int]], cut: int | None) -> None:
    try:
        array, _ = prepare(mutate(SEED_IMAGE, edits, cut), 32, 1_000_000)
        assert array.shape == (32, 32, 3)
    except ServiceError as exc:
        assert exc.status == 400


@FUZZ
@given(st.dictionaries(st.text(min_size=1, max_size=40), st.binary(max_size=64), max_size=6))
def test_odd_names_in_zips_never_crash(files: dict[str, bytes]) -> None:
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names we mean to make
        for name, data in files.items():
            try:
                zf.writestr(name, data)
            except (ValueError, UnicodeEncodeError, IndexError):
                pass  # names zipfile itself will not write
    ingest_everything(out.getvalue())
