"""NATS JetStream as an event source: a durable pull consumer with explicit acks.

The events stream and the dead-letter stream are made when absent (file storage), so a
fresh server works at once; where operators manage streams, the existing ones are used.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType
from nats.js.errors import NotFoundError

from cohortflow.events.stream import Lag, StreamMessage
from cohortflow.settings import Settings


class JetStreamSource:
    """Events from ``settings.events_subject``; dead letters to ``dead_letter_subject``."""

    def __init__(self, client: NatsClient, stream: JetStreamContext, settings: Settings) -> None:
        self._client = client
        self._js = stream
        self._settings = settings
        self._subscription: JetStreamContext.PullSubscription | None = None

    @classmethod
    async def connect(cls, settings: Settings) -> JetStreamSource:
        """Connect, make the streams if absent, and bind the durable consumer."""
        client = await nats.connect(settings.nats_url, connect_timeout=5, max_reconnect_attempts=-1)
        source = cls(client, client.jetstream(), settings)
        await source._ensure_stream(settings.events_stream, settings.events_subject)
        await source._ensure_stream(_dead_stream(settings), settings.dead_letter_subject)
        source._subscription = await source._js.pull_subscribe(
            settings.events_subject,
            durable=settings.events_consumer,
            stream=settings.events_stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=settings.consume_ack_wait_seconds,
                max_deliver=-1,
            ),
        )
        return source

    async def _ensure_stream(self, name: str, subject: str) -> None:
        try:
            await self._js.stream_info(name)
        except NotFoundError:
            await self._js.add_stream(name=name, subjects=[subject], storage=StorageType.FILE)

    async def fetch(self, max_messages: int, wait: float) -> Sequence[StreamMessage]:
        """Up to ``max_messages`` messages; none when nothing came within ``wait`` s."""
        assert self._subscription is not None
        try:
            return await self._subscription.fetch(max_messages, timeout=wait)
        except NatsTimeout:
            return []

    async def dead_letter(self, document: dict[str, Any]) -> None:
        """Publish a refused event and its errors, waiting for the stream to store it."""
        await self._js.publish(self._settings.dead_letter_subject, json.dumps(document).encode())

    async def confirm(self) -> None:
        """Flush: the acks sent so far have reached the server."""
        await self._client.flush()

    async def lag(self) -> Lag:
        """Pending and unacknowledged messages of the consumer; dead letters stored."""
        assert self._subscription is not None
        info = await self._subscription.consumer_info()
        dead = await self._js.stream_info(_dead_stream(self._settings))
        return Lag(
            pending=info.num_pending or 0,
            unacknowledged=info.num_ack_pending or 0,
            dead_letters=dead.state.messages,
        )

    async def close(self) -> None:
        """Disconnect (acks were flushed by :meth:`confirm`; unacked messages come again)."""
        await self._client.close()


def _dead_stream(settings: Settings) -> str:
    return f"{settings.events_stream}_DEAD"
