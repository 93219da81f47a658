"""Chosen members of a zip, read by their local headers without its central directory: a shard of
a sharded job knows its members from the job's plan and reads only them, so what it costs grows
with the shard, not with the zip (a million-entry directory takes seconds and a gigabyte to parse).
"""

from __future__ import annotations

import dataclasses
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

LOCAL_HEADER = 30  # bytes before a member's name: signature ... name length, extra length
SIGNATURE = b"PK\x03\x04"


@dataclass(frozen=True)
class Member:
    """What the plan records of one member: where its bytes are and how to check them."""

    index: int  # among the job's planned entries
    name: str
    label: str | None
    offset: int  # of its local header
    compressed: int
    size: int
    method: int
    crc: int
    end: int  # where the next member (or the directory) starts: its bytes never pass it

    @classmethod
    def of(cls, index: int, name: str, label: str | None, info: zipfile.ZipInfo, end: int) -> Member:
        fields = (info.header_offset, info.compress_size, info.file_size, info.compress_type, info.CRC)
        return cls(index, name, label, *fields, end)

    def info(self) -> zipfile.ZipInfo:
        info = Bounded(self.name)
        info.header_offset, info.compress_size, info.file_size = self.offset, self.compressed, self.size
        info.compress_type, info.CRC, info.end = self.method, self.crc, self.end
        return info

    def to_json(self) -> list[Any]:
        return list(dataclasses.astuple(self))

    @classmethod
    def from_json(cls, row: list[Any]) -> Member:
        return cls(*row)


class Bounded(zipfile.ZipInfo):
    """A ZipInfo that knows where its member's bytes must end."""

    end: int = 1 << 62


class MemberReader:
    """`read(info)` as `ZipFile.read` does it, for members whose directory fields are known: stored
    and deflated ones from their local header and data alone (the sizes and CRC from the plan are
    checked: a member never expands past its declared size); any other method through a ZipFile
    over the same file, opened the first time one is met."""

    def __init__(self, raw: IO[bytes], whole: Callable[[], zipfile.ZipFile]) -> None:
        self.raw = raw
        self._whole = whole
        self._zip: zipfile.ZipFile | None = None
        self._by_offset: dict[int, zipfile.ZipInfo] = {}

    def read(self, info: zipfile.ZipInfo, /) -> bytes:
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            if self._zip is None:
                self._zip = self._whole()
                self._by_offset = {i.header_offset: i for i in self._zip.infolist()}
            found = self._by_offset.get(info.header_offset)  # by offset: names may repeat
            if found is None:
                raise zipfile.BadZipFile(f"no member of the zip starts where {info.filename} should")
            return self._zip.read(found)
        self.raw.seek(info.header_offset)
        header = self.raw.read(LOCAL_HEADER)
        if len(header) < LOCAL_HEADER or header[:4] != SIGNATURE:
            raise zipfile.BadZipFile(f"bad local file header for {info.filename}")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        start = info.header_offset + LOCAL_HEADER + name_length + extra_length
        if start + info.compress_size > getattr(info, "end", 1 << 62):
            # A directory entry claiming more bytes than lie before the next member.
            raise zipfile.BadZipFile(f"{info.filename} overlaps the next member of the zip")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise zipfile.BadZipFile(f"{info.filename}: a stored member of two sizes")
        self.raw.seek(start)
        data = self.raw.read(info.compress_size)
        if len(data) < info.compress_size:
            raise EOFError(f"{info.filename} is cut short")
        if info.compress_type == zipfile.ZIP_DEFLATED:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = inflater.decompress(data, info.file_size + 1)
            if inflater.unconsumed_tail:
                raise zipfile.BadZipFile(f"{info.filename} expands past its declared size")
        if len(data) != info.file_size or zlib.crc32(data) != info.CRC:
            raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")
        return data

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
