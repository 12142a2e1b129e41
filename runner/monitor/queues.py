"""How many messages wait in each queue and for how long, summing kombu's Redis priority sub-lists.

kombu keeps a queue's messages in one Redis list per priority step ("dataset", "dataset\\x06\\x163",
…), pushing on the left and taking from the right (a restored message goes back on the right). A
message's age comes from the `sent_at` header our app adds to every message it publishes
(`stamp_sent_at`); a message from another sender has no age.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

from runner.monitor.channel import read_channel
from runner.strict_json import loads_or_none

SENT_AT_HEADER = "sent_at"


@dataclass(frozen=True)
class QueueDepth:
    name: str
    depth: int
    oldest_sent_at: float | None  # the earliest `sent_at` of the messages at either end of each sub-list

    def oldest_age(self, now: float | None = None) -> float | None:
        if self.oldest_sent_at is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.oldest_sent_at)


def stamp_sent_at(headers: dict | None = None, **_) -> None:
    """`before_task_publish` receiver: the time a message was sent, for the oldest waiting message's age."""
    if headers is not None and SENT_AT_HEADER not in headers:
        headers[SENT_AT_HEADER] = time.time()


def queue_depths(app, queues: Iterable[str]) -> dict[str, int]:
    """Depth of each queue through the app's broker connection (embedded broker or real Redis)."""
    return {name: state.depth for name, state in queue_states(app, queues).items()}


def queue_states(app, queues: Iterable[str]) -> dict[str, QueueDepth]:
    with read_channel(app) as channel:
        return channel_queue_states(channel, queues)


def channel_queue_depths(channel, queues: Iterable[str]) -> dict[str, int]:
    """Depths through a kombu Redis channel (for callers without a Celery app)."""
    return {name: state.depth for name, state in channel_queue_states(channel, queues).items()}


def channel_queue_states(channel, queues: Iterable[str]) -> dict[str, QueueDepth]:
    names = list(queues)
    keys = {name: [channel._q_for_pri(name, step) for step in channel.priority_steps] for name in names}
    with channel.client.pipeline(transaction=False) as pipe:
        for name in names:
            for key in keys[name]:
                pipe.llen(key)
                pipe.lindex(key, 0)   # newest, or a restored message's neighbour
                pipe.lindex(key, -1)  # next to be taken: usually the oldest
        replies = iter(pipe.execute())
    states = {}
    for name in names:
        depth, sent = 0, []
        for _ in keys[name]:
            length, first, last = next(replies), next(replies), next(replies)
            depth += length
            sent.extend(stamp for stamp in (_sent_at(first), _sent_at(last)) if stamp is not None)
        states[name] = QueueDepth(name, depth, min(sent) if sent else None)
    return states


CONTROL_EXCHANGES = ("celery.pidbox", "reply.celery.pidbox", "celeryev")  # broadcast and events, not work


def bound_queues(channel) -> set[str]:
    """Every work queue a sender or worker has declared on this broker (kombu records each binding
    in a `_kombu.binding.<exchange>` set, "routing key␆␖pattern␆␖queue"), beyond the topology's:
    a user project's own queues, or a typo in someone's `queue=`. Celery's control and event
    queues are left out."""
    prefix = channel.keyprefix_queue % ""
    found: set[str] = set()
    for key in channel.client.scan_iter(match=channel.keyprefix_queue % "*", count=1000):
        exchange = (key.decode() if isinstance(key, bytes) else key)[len(prefix):]
        if exchange in CONTROL_EXCHANGES:
            continue
        for member in channel.client.smembers(key):
            queue = (member.decode() if isinstance(member, bytes) else member).split(channel.sep)[-1]
            if queue:
                found.add(queue)
    return found


def observed_queue_states(channel, consumed: Iterable[str] = ()) -> dict[str, QueueDepth]:
    """The topology's 16 queues in its order, then, by name, any other queue that holds messages or
    is `consumed` (a user project's own, or a typo in someone's `queue=`); one declared once, empty
    and unconsumed, is noise and left out."""
    from runner.topology import BY_NAME, QUEUE_NAMES

    consumed = set(consumed)
    names = [*QUEUE_NAMES, *sorted((bound_queues(channel) | consumed) - set(QUEUE_NAMES))]
    return {name: state for name, state in channel_queue_states(channel, names).items()
            if name in BY_NAME or state.depth or name in consumed}


def purge_queue(channel, name: str) -> int:
    """Delete every message waiting in `name` (all its priority sub-lists); how many there were."""
    return channel.queue_purge(name) or 0


def _sent_at(raw: bytes | None) -> float | None:
    message = loads_or_none(raw)
    try:
        value = message.get("headers", {}).get(SENT_AT_HEADER)
    except AttributeError:
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
