"""What the workers say about themselves, asked over Celery's broadcast control (kombu's pidbox).

Every function waits at most `timeout` seconds and returns only the workers that answered in
time, keyed by node name (`worker@host`); an empty dict means no worker answered. Celery waits the
whole timeout unless told how many replies to expect: a round asks `known_workers` first, and ends
once they have all answered (at once when none is bound).
"""

from __future__ import annotations

from typing import Any

from runner.monitor.channel import read_channel

INSPECT_METHODS = ("active", "scheduled", "reserved", "registered", "stats", "ping", "active_queues")
DEFAULT_TIMEOUT = 1.0
POOL_NAMES = {"thread": "threads", "prefork": "prefork", "solo": "solo", "gevent": "gevent", "eventlet": "eventlet"}


def pool_name(implementation: str) -> str:
    """The -P name of a pool from `stats`' implementation ('celery.concurrency.thread:TaskPool' → 'threads')."""
    return POOL_NAMES.get(implementation.split(":")[0].rsplit(".", 1)[-1], implementation)


def inspect(app, method: str, timeout: float = DEFAULT_TIMEOUT,
            destination: list[str] | None = None) -> dict[str, Any]:
    """One `celery inspect METHOD` round: each answering worker's reply, returned as soon as every
    worker that can answer has (those named in `destination`, or those bound on the broker)."""
    if method not in INSPECT_METHODS:
        raise ValueError(f"unknown inspect method {method!r}; one of: {', '.join(INSPECT_METHODS)}")
    limit = None  # Celery's default with a destination: as many as it names
    if not destination:
        with read_channel(app) as channel:
            limit = len(known_workers(channel))
        if limit == 0:
            return {}  # no worker is bound to the broadcast exchange: none can answer
    inspector = app.control.inspect(timeout=timeout, destination=destination, limit=limit)
    return getattr(inspector, method)() or {}


def active_queues(app, timeout: float = DEFAULT_TIMEOUT) -> dict[str, list[str]]:
    """The queues each answering worker consumes."""
    return {worker: sorted(queue["name"] for queue in queues or [])
            for worker, queues in inspect(app, "active_queues", timeout).items()}


PIDBOX_EXCHANGE = "celery.pidbox"  # Celery's broadcast exchange; each worker binds a queue of its own


def known_workers(channel) -> list[str]:
    """Node names of the workers bound to the broadcast exchange on this broker: every worker
    running, plus any killed without a warm shutdown (its binding stays until a worker of that
    name stops warmly). So never fewer than can answer: a safe `limit`."""
    suffix = f".{PIDBOX_EXCHANGE}"
    names = []
    for member in channel.client.smembers(channel.keyprefix_queue % PIDBOX_EXCHANGE):
        queue = (member.decode() if isinstance(member, bytes) else member).split(channel.sep)[-1]
        if queue.endswith(suffix):
            names.append(queue[:-len(suffix)])
    return sorted(names)


def consumers_by_queue(queues_of_workers: dict[str, list[str]]) -> dict[str, list[str]]:
    """The inverse of `active_queues`: each queue's consuming workers, sorted."""
    consumers: dict[str, list[str]] = {}
    for worker, queues in sorted(queues_of_workers.items()):
        for queue in queues:
            consumers.setdefault(queue, []).append(worker)
    return consumers
