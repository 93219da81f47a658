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

    def send_many(self, messages: list[dict[str, Any]]) -> None:
        """Send messages ten at a time (SQS's batch limit); any message refused fails the call."""
        from botocore.exceptions import BotoCoreError, ClientError

        for start in range(0, len(messages), 10):
            batch = [
                {"Id": str(i), "MessageBody": json.dumps(m)}
                for i, m in enumerate(messages[start : start + 10])
            ]
            try:
                answer = self.client.send_message_batch(QueueUrl=self.url, Entries=batch)
            except (BotoCoreError, ClientError) as exc:
                raise StorageError(f"could not queue the job's shards on {self.url}: {exc}") from exc
            if answer.get("Failed"):
                raise StorageError(
                    f"SQS refused {len(answer['Failed'])} shard messages: {answer['Failed'][0]}"
                )
