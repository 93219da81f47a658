"""boto3 clients made on first use: after gunicorn forks, one per worker, shared by its threads."""

from __future__ import annotations

import threading
from typing import Any


class LazyClient:
    """A boto3 client for one service, created the first time it is needed (boto3 clients are
    thread-safe, but must not cross a fork)."""

    def __init__(self, service: str, endpoint_url: str | None, region: str | None, **config: Any) -> None:
        self.service = service
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.config = {"connect_timeout": 5, "retries": {"mode": "standard"}, **config}
        self._client: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.session.Session().client(
                    self.service,
                    endpoint_url=self.endpoint_url,
                    region_name=self.region,
                    config=Config(**self.config),
                )
            return self._client
