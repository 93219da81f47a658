"""S3 storage (boto3): keys live under s3://bucket/prefix/; credentials come from boto3's chain.

Conditional writes use S3's If-None-Match / If-Match on PutObject, so CURRENT is compare-and-
swapped. Large files go up as multipart uploads. The client is made lazily, after gunicorn
forks, and is shared by the threads of a worker (boto3 clients are thread-safe).
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, cast

from service.core.errors import StorageError
from service.storage.aws import LazyClient
from service.storage.base import KeyNotFoundError, SharedBucket, Storage, check_key
from service.storage.ranged import RangedFile

MB = 1024 * 1024
NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
PRECONDITION_FAILED = {"412", "PreconditionFailed", "409", "ConditionalRequestConflict"}


class S3Storage(Storage, SharedBucket):
    upload_concurrency = 16  # one PUT is tens of milliseconds; thousands of images go up in parallel

    def __init__(
        self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str | None = None
    ) -> None:
        if not bucket:
            raise ValueError("an s3:// STORAGE_URI needs a bucket: s3://<bucket>/<prefix>")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = LazyClient(
            "s3",
            self.endpoint_url,
            self.region,
            # SigV4 everywhere: newer regions accept nothing else, pre-signed URLs included.
            signature_version="s3v4",
            read_timeout=60,
            # S3-compatible servers (a local one in tests, MinIO) need path-style URLs.
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
            max_pool_connections=32,
        )

    @property
    def client(self) -> Any:
        return self._client.get()

    @staticmethod
    def _transfer() -> Any:
        """Multipart above 16 MB: big indexes and vectors move in parallel parts, and a failed part
        is retried alone instead of the whole file."""
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=16 * MB, multipart_chunksize=16 * MB, max_concurrency=4)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Turn boto3's exceptions into the service's: missing keys, and S3 being unreachable."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in NOT_FOUND:
                raise KeyNotFoundError(key) from None
            raise StorageError(f"S3 {action} of {self.uri}/{key} failed: {code} {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 {action} of {self.uri}/{key} failed: {exc}") from exc

    def read(self, key: str) -> bytes:
        return self.read_tagged(key)[0]

    def read_tagged(self, key: str) -> tuple[bytes, str]:
        with self._errors("read", key):
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read(), response["ETag"]

    def tag(self, key: str) -> str | None:
        try:
            with self._errors("head", key):
                return str(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ETag"])
        except KeyNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        with self._errors("write", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def write_if(self, key: str, data: bytes, expected_tag: str | None) -> bool:
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if expected_tag is None else {"IfMatch": expected_tag}
        try:
            with self._errors("conditional write", key):
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
        except StorageError as exc:
            cause = exc.__cause__
            if (
                isinstance(cause, ClientError)
                and str(cause.response.get("Error", {}).get("Code", "")) in PRECONDITION_FAILED
            ):
                return False
            raise
        except KeyNotFoundError:
            return False  # If-Match on a key someone deleted meanwhile
        return True

    def upload(self, key: str, path: Path) -> None:
        with self._errors("upload", key):
            if path.stat().st_size < 16 * MB:  # one PUT: the transfer manager costs more CPU than it saves
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=path.read_bytes())
            else:
                self.client.upload_file(str(path), self.bucket, self._key(key), Config=self._transfer())

    def copy(self, source: str, key: str) -> None:
        # Server-side: the bytes never leave S3 (managed copy: multipart above 5 GB).
        with self._errors("copy", source):
            self.client.copy(
                {"Bucket": self.bucket, "Key": self._key(source)},
                self.bucket,
                self._key(key),
                Config=self._transfer(),
            )

    def download(self, key: str, path: Path) -> None:
        self.download_object(self._key(key), path, key)

    def exists(self, key: str) -> bool:
        return self.tag(key) is not None

    def _list(self, prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        full = self._key(prefix.rstrip("/")) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        with self._errors("list", prefix or "/"):
            yield from self.client.get_paginator("list_objects_v2").paginate(**kwargs)

    def _strip(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def list(self, prefix: str) -> list[str]:
        return sorted(self._strip(o["Key"]) for page in self._list(prefix) for o in page.get("Contents", []))

    def list_folders(self, prefix: str) -> builtins.list[str]:
        folders = (
            self._strip(p["Prefix"]).rstrip("/").rsplit("/", 1)[-1]
            for page in self._list(prefix, delimiter="/")
            for p in page.get("CommonPrefixes", [])
        )
        return sorted(folders)

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        self.delete_many(self.list(prefix))

    def delete_many(self, keys: builtins.list[str]) -> None:
        full = [self._key(k) for k in keys]
        for start in range(0, len(full), 1000):  # DeleteObjects takes at most 1000 keys
            chunk = [{"Key": k} for k in full[start : start + 1000]]
            with self._errors("delete", chunk[0]["Key"]):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})

    # --- SharedBucket: whole-bucket addressing, for zips uploaded straight to S3 -----------------

    def uri_of(self, key: str) -> str:
        """s3:// URI of a key, or of a folder-like prefix ending in '/'."""
        folder = key.endswith("/")
        return f"s3://{self.bucket}/{self._key(key.rstrip('/'))}" + ("/" if folder else "")

    def bucket_key(self, uri: str) -> str | None:
        """The object key of an s3:// URI in this store's bucket; None for any other bucket."""
        if not uri.startswith(f"s3://{self.bucket}/"):
            return None
        key = uri[len(f"s3://{self.bucket}/") :]
        return key if key and not key.endswith("/") else None

    def object_size(self, bucket_key: str) -> int:
        """Size of any object in the bucket (KeyNotFoundError if there is none)."""
        with self._errors("head", bucket_key):
            return int(self.client.head_object(Bucket=self.bucket, Key=bucket_key)["ContentLength"])

    def download_object(self, bucket_key: str, path: Path, name: str | None = None) -> None:
        """Download any object of the bucket (`name`: the key as errors should call it)."""
        with self._errors("download", name or bucket_key):
            self.client.download_file(self.bucket, bucket_key, str(path), Config=self._transfer())

    def signed_upload_url(self, key: str, expires_s: int) -> str:
        """A pre-signed PUT for `key` (so large zips go straight to S3, not through the web tier)."""
        return self._presign("put_object", key, expires_s)

    def signed_url(self, key: str, expires_s: int, content_type: str | None = None) -> str | None:
        return self._presign("get_object", key, expires_s, content_type)

    def _presign(self, method: str, key: str, expires_s: int, content_type: str | None = None) -> str:
        with self._errors("presign", key):
            params = {"Bucket": self.bucket, "Key": self._key(key)}
            if content_type:
                params["ResponseContentType"] = content_type
            return str(self.client.generate_presigned_url(method, Params=params, ExpiresIn=expires_s))

    def open_object(self, bucket_key: str, etag: str | None = None) -> BinaryIO:
        """A seekable file over ranged GETs of an object (`etag`: fail if it is no longer that)."""
        return cast(BinaryIO, RangedFile(self.client, self.bucket, bucket_key, etag))
