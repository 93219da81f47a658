"""The job queue: training jobs sent to SQS for the Elastic Beanstalk worker tier."""

from __future__ import annotations

import json
from typing import Any

from service.core.errors import StorageError
from service.storage.aws import LazyClient


class SqsQueue:
    """Sends job messages to one SQS queue; the client is made lazily (after gunicorn forks)."""

    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None) -> None:
        self.url = url
        self._client = LazyClient("sqs", endpoint_url, region, read_timeout=30)

    @property
    def client(self) -> Any:
        return self._client.get()

    def send(self, message: dict[str, Any]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.send_message(QueueUrl=self.url, MessageBody=json.dumps(message))
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not queue the training job on {self.url}: {exc}") from exc
