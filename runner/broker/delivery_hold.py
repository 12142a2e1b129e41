"""Hold each task message a worker pops, as kombu would, but in the pop itself.

kombu's Redis transport emulates acknowledgements: the worker pops a message with BRPOP and then,
in a second round trip, writes it to the `unacked` hash (and its time to `unacked_index`) until
its ack deletes it; a worker's sweep puts back those held longer than the visibility timeout. A
worker killed between the two round trips, or a broker killed after answering the pop, loses the
message: it is in no queue and in no hash (measured: about one task per kill).

So the broker writes that same entry itself, in the pop's own batch of the log, before the pop is
answered. kombu's QoS.append then overwrites it with the same content, and its ack or reject
deletes it, exactly as before. Only Celery task messages are held: JSON with a delivery tag and a
task header. Replies to `celery inspect` and other messages that consumers take without acks
(kombu never deletes their entry) are left alone.
"""

from __future__ import annotations

import functools
import json
import time

from kombu.transport.redis import Channel

# kombu's own key names (its transport options unacked_key, unacked_index_key; dify-local keeps
# the defaults, and a global key prefix is not supported by this runner)
UNACKED_KEY = Channel.unacked_key.encode()
UNACKED_INDEX_KEY = Channel.unacked_index_key.encode()
LARGEST_HELD = 64 * 1024 * 1024  # a message beyond this is not parsed (no Celery task is near it)


def task_delivery(message: bytes) -> tuple[bytes, str, str] | None:
    """(delivery tag, exchange, routing key) of a Celery task message as kombu's Redis transport
    stores it; None for anything else."""
    if not message.startswith(b"{") or len(message) > LARGEST_HELD:
        return None
    try:
        payload = json.loads(message)
    except (ValueError, RecursionError):
        return None
    try:
        properties, headers = payload["properties"], payload["headers"]
        tag, info = properties["delivery_tag"], properties["delivery_info"]
        exchange, routing_key = info["exchange"], info["routing_key"]
        is_task = isinstance(headers.get("task"), str) and isinstance(headers.get("id"), str)
    except (KeyError, TypeError, AttributeError):
        return None
    if not (is_task and isinstance(tag, str) and tag and isinstance(exchange, str) and isinstance(routing_key, str)):
        return None
    return tag.encode(), exchange, routing_key


def held_entry(message: bytes, exchange: str, routing_key: str) -> bytes:
    """The `unacked` hash's value, as kombu's QoS.append writes it: [message, exchange, routing key]."""
    return b"[%s%s" % (message, _entry_end(exchange, routing_key))


@functools.lru_cache(maxsize=256)  # a few exchanges and queues, one pair per task pop: json.dumps costs 1 µs each
def _entry_end(exchange: str, routing_key: str) -> bytes:
    return b", %s, %s]" % (json.dumps(exchange).encode(), json.dumps(routing_key).encode())


def hold_commands(message: bytes, now: float | None = None) -> list[list[bytes]] | None:
    """The HSET and ZADD that hold `message` as delivered, or None when it is not a task message."""
    delivery = task_delivery(message)
    if delivery is None:
        return None
    tag, exchange, routing_key = delivery
    score = b"%.6f" % (time.time() if now is None else now)
    return [[b"hset", UNACKED_KEY, tag, held_entry(message, exchange, routing_key)],
            [b"zadd", UNACKED_INDEX_KEY, score, tag]]

