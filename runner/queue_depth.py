"""How many messages wait in each queue, summing kombu's Redis priority sub-lists."""

from __future__ import annotations

from typing import Iterable


def queue_depths(app, queues: Iterable[str]) -> dict[str, int]:
    """Depth of each queue through the app's broker connection (embedded broker or real Redis)."""
    with app.connection_for_read() as connection:
        return channel_queue_depths(connection.default_channel, queues)


def channel_queue_depths(channel, queues: Iterable[str]) -> dict[str, int]:
    """The same through a kombu Redis channel (for callers without a Celery app)."""
    names = list(queues)
    # kombu keeps a queue's messages in one list per priority step ("dataset", "dataset\x06\x163", …)
    keys = {name: [channel._q_for_pri(name, step) for step in channel.priority_steps] for name in names}
    with channel.client.pipeline(transaction=False) as pipe:
        for name in names:
            for key in keys[name]:
                pipe.llen(key)
        lengths = iter(pipe.execute())
    return {name: sum(next(lengths) for _ in keys[name]) for name in names}
