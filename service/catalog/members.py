"""Chosen members of a zip, read by their local headers without its central directory: a shard of
a sharded job knows its members from the job's plan and reads only them, so what it costs grows
with the shard, not with the zip (a million-entry directory takes seconds and a gigabyte to parse).
"""

from __future__ import annotations

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

    @classmethod
    def of(cls, index: int, name: str, label: str | None, info: zipfile.ZipInfo) -> Member:
        return cls(
            index,
            name,
            label,
            info.header_offset,
            info.compress_size,
            info.file_size,
            info.compress_type,
            info.CRC,
        )

    def info(self) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(self.name)
        info.header_offset, info.compress_size, info.file_size = self.offset, self.compressed, self.size
        info.compress_type, info.CRC = self.method, self.crc
        return info

    def to_json(self) -> list[Any]:
        return [
            self.index,
            self.name,
            self.label,
            self.offset,
            self.compressed,
            self.size,
            self.method,
            self.crc,
        ]

    @classmethod
    def from_json(cls, row: list[Any]) -> Member:
        return cls(*row)


class MemberReader:
    """`read(info)` as `ZipFile.read` does it, for members whose directory fields are known: stored
    and deflated ones from their local header and data alone (the sizes and CRC from the plan are
    checked: a member never expands past its declared size); any other method through a ZipFile
    over the same file, opened the first time one is met."""

    def __init__(self, raw: IO[bytes], whole: Callable[[], zipfile.ZipFile]) -> None:
        self.raw = raw
        self._whole = whole
        self._zip: zipfile.ZipFile | None = None

    def read(self, info: zipfile.ZipInfo, /) -> bytes:
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            if self._zip is None:
                self._zip = self._whole()
            return self._zip.read(info.filename)
        self.raw.seek(info.header_offset)
        header = self.raw.read(LOCAL_HEADER)
        if len(header) < LOCAL_HEADER or header[:4] != SIGNATURE:
            raise zipfile.BadZipFile(f"bad local file header for {info.filename}")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        self.raw.seek(info.header_offset + LOCAL_HEADER + name_length + extra_length)
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
