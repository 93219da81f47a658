"""The job queue: training jobs sent to SQS for the Elastic Beanstalk worker tier."""

from __future__ import annotations

import json
import threading
from typing import Any

from .errors import StorageError


class SqsQueue:
    """Sends job messages to one SQS queue; the client is made lazily (after gunicorn forks)."""

    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None) -> None:
        self.url = url
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.session.Session().client(
                    "sqs",
                    endpoint_url=self.endpoint_url,
                    region_name=self.region,
                    config=Config(connect_timeout=5, read_timeout=30, retries={"mode": "standard"}),
                )
            return self._client

    def send(self, message: dict[str, Any]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.send_message(QueueUrl=self.url, MessageBody=json.dumps(message))
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not queue the training job on {self.url}: {exc}") from exc
