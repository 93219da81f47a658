"""A seekable, read-only file over ranged GETs of one S3 object, so `zipfile` reads a zip in S3
member by member (its central directory, then only the members asked for) without downloading it.

Reads go through a small read-ahead buffer: `zipfile` reads a member's local header (30 bytes),
its name, then its data, and one GET should serve all three. Every GET carries `If-Match` with the
ETag the object had when it was opened, so a zip replaced in the bucket meanwhile fails loudly
(StorageError) instead of mixing two uploads.
"""

from __future__ import annotations

import io
from typing import Any

from service.core.errors import StorageError, TrainingError

READ_AHEAD = 1024 * 1024  # bytes per GET beyond what was asked: a few images of a typical zip


class RangedFile(io.RawIOBase):
    """`client.get_object` with `Range` for every read that misses the buffer."""

    def __init__(
        self, client: Any, bucket: str, key: str, etag: str | None = None, read_ahead: int = READ_AHEAD
    ) -> None:
        self.client, self.bucket, self.key = client, bucket, key
        head = self._call("head", client.head_object, Bucket=bucket, Key=key, **_if(etag))
        self.etag: str = etag or head["ETag"]
        self.size = int(head["ContentLength"])
        self.read_ahead = read_ahead
        self.requests = 1  # the HEAD
        self._pos = 0
        self._buf_start = 0
        self._buf = b""

    def _call(self, action: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("412", "PreconditionFailed"):  # bad input for good: no retry helps
                raise TrainingError(
                    f"s3://{self.bucket}/{self.key} changed while it was being read (its ETag is no "
                    f"longer {kwargs.get('IfMatch')}); upload it again and start a new job"
                ) from None
            raise StorageError(f"S3 {action} of s3://{self.bucket}/{self.key} failed: {code} {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 {action} of s3://{self.bucket}/{self.key} failed: {exc}") from exc

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, target: Any) -> int:
        view = memoryview(target).cast("B")
        want = min(len(view), self.size - self._pos)
        if want <= 0:
            return 0
        start = self._pos - self._buf_start
        if not (0 <= start and self._pos + want <= self._buf_start + len(self._buf)):
            self._fill(want)
            start = 0
        view[:want] = self._buf[start : start + want]
        self._pos += want
        return want

    def _fill(self, want: int) -> None:
        end = min(self.size, self._pos + max(want, self.read_ahead)) - 1
        response = self._call(
            "ranged read",
            self.client.get_object,
            Bucket=self.bucket,
            Key=self.key,
            Range=f"bytes={self._pos}-{end}",
            IfMatch=self.etag,
        )
        self.requests += 1
        self._buf_start, self._buf = self._pos, response["Body"].read()
        if len(self._buf) < min(want, self.size - self._pos):
            raise StorageError(f"s3://{self.bucket}/{self.key}: a ranged read came back short")


def _if(etag: str | None) -> dict[str, str]:
    return {"IfMatch": etag} if etag else {}
