"""Reading a zip's members by their local headers (what a shard does), checked against zipfile."""

from __future__ import annotations

import io
import zipfile
import zlib

import pytest

from service.catalog import ingest
from service.catalog.members import Member, MemberReader

FILES = {"a/one.jpg": b"x" * 5000, "b/two.png": bytes(range(256)) * 40, "c/three.jpg": b"tiny"}


def made(method: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as zf:
        for name, data in FILES.items():
            zf.writestr(name, data)
    return out.getvalue()


def members_of(data: bytes) -> list[Member]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        ends = [i.header_offset for i in infos[1:]] + [zf.start_dir]  # type: ignore[attr-defined]
        return [Member.of(i, info.filename, None, info, ends[i]) for i, info in enumerate(infos)]


@pytest.mark.parametrize(
    "method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
)
def test_members_read_as_zipfile_reads_them(method: int) -> None:
    data = made(method)
    opened: list[int] = []
    raw = io.BytesIO(data)

    def whole() -> zipfile.ZipFile:
        opened.append(1)
        return zipfile.ZipFile(raw)

    reader = MemberReader(raw, whole)
    for member in members_of(data):
        round_trip = Member.from_json(member.to_json())
        assert reader.read(round_trip.info()) == FILES[member.name]
    # Stored and deflated members never need the zip's directory; other methods open it once.
    assert len(opened) == (0 if method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) else 1)


def test_a_member_that_lies_about_its_size_or_crc_is_refused() -> None:
    data = made(zipfile.ZIP_DEFLATED)
    member = members_of(data)[0]
    reader = MemberReader(io.BytesIO(data), lambda: zipfile.ZipFile(io.BytesIO(data)))
    small = member.info()
    small.file_size = 100  # a plan that says 100 bytes: the member may not expand past it
    with pytest.raises(zipfile.BadZipFile, match="expands past"):
        reader.read(small)
    wrong = member.info()
    wrong.CRC = zlib.crc32(b"something else")
    with pytest.raises(zipfile.BadZipFile, match="CRC"):
        reader.read(wrong)
    # As an entry of a shard, both are skipped with a reason, like any unreadable member.
    entry = ingest.Entry(member.name, None, wrong)
    with pytest.raises(ingest.TrainingError, match="could not be read"):
        ingest.read_entry(reader, entry)


def test_an_offset_that_is_no_local_header_is_refused() -> None:
    data = made(zipfile.ZIP_STORED)
    info = members_of(data)[1].info()
    info.header_offset += 7
    with pytest.raises(zipfile.BadZipFile, match="local file header"):
        MemberReader(io.BytesIO(data), lambda: zipfile.ZipFile(io.BytesIO(data))).read(info)


def test_a_member_claiming_the_bytes_of_the_next_is_refused_before_any_is_read() -> None:
    data = made(zipfile.ZIP_STORED)
    first = members_of(data)[2]  # the smallest: 4 bytes
    lying = first.info()
    lying.compress_size = lying.file_size = 5_000_000  # its directory entry says 5 MB
    reads: list[int] = []

    class Counting(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            reads.append(size or 0)
            return super().read(size)

    with pytest.raises(zipfile.BadZipFile, match="overlaps the next member"):
        MemberReader(Counting(data), lambda: zipfile.ZipFile(io.BytesIO(data))).read(lying)
    assert max(reads) <= 30  # only its local header was read
