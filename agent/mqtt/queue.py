"""What the MQTT session needs of the durable queue it drains, and the wire size of a PUBLISH.

The session (agent/mqtt/connection.py) sits below telemetry: it declares here the queue it pumps
(``MessageQueue``) and the rows it reads (``QueuedMessage``); telemetry's outbox
(agent/telemetry/outbox.py) implements both and is handed to the session by the daemon. So the
session imports nothing of telemetry, and telemetry imports these names from here.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

MQTT_PACKET_ID_BYTES = 2  # QoS 1 packets carry a packet identifier
MQTT5_EMPTY_PROPERTIES_BYTES = 1  # the property length byte of a PUBLISH without properties


class QueuedMessage(Protocol):
    """One message waiting for its PUBACK."""

    @property
    def id(self) -> int: ...
    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def qos(self) -> int: ...
    @property
    def retain(self) -> bool: ...
    @property
    def kind(self) -> str: ...


class MessageQueue(Protocol):
    """A durable FIFO the session publishes in id order and trims on each PUBACK."""

    def next_seq(self, stream: str) -> int:
        """Allocate the next number of ``stream`` (the session number, for messages that bypass the queue)."""
        ...

    def peek(self, after_id: int, limit: int) -> list[Any]:
        """Up to ``limit`` ``QueuedMessage`` rows with id > ``after_id``, oldest first."""
        ...

    def ack(self, ids: list[int]) -> None:
        """The broker acknowledged these rows."""
        ...

    def notify(self) -> None:
        """Wake a waiter of ``wait_change``."""
        ...

    def wait_change(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for a row added or acknowledged."""
        ...

    def depth(self) -> int:
        """Rows waiting for their PUBACK."""
        ...


def dumps(doc: dict[str, Any]) -> bytes:
    """Compact JSON: every byte counts on a cellular link."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def mqtt_publish_bytes(topic: str, payload_len: int, mqtt5: bool = True, qos: int = 1) -> int:
    """Size of a PUBLISH packet on the wire (fixed header, topic, packet id, properties, payload)."""
    remaining = 2 + len(topic.encode()) + payload_len
    if qos > 0:
        remaining += MQTT_PACKET_ID_BYTES
    if mqtt5:
        remaining += MQTT5_EMPTY_PROPERTIES_BYTES
    length_bytes = 1
    n = remaining
    while n >= 128:
        n //= 128
        length_bytes += 1
    return 1 + length_bytes + remaining
