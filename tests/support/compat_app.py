"""The Celery app of the compatibility suite (tests/test_compat.py): the same tasks, run by real
workers and a real beat against the embedded broker and against redis-server.

The worker and beat processes build `app` from the environment (`COMPAT_BROKER_URL`, and
optionally `COMPAT_VISIBILITY_TIMEOUT`, `COMPAT_BEAT_QUEUE`, `COMPAT_BEAT_KEY`); the test process builds its own
clients with `create_app`. Tasks leave their traces in the broker's own Redis (a JSON line per run
pushed on a list named by the test), so a test can count runs and read when, where and from which
queue each one ran.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from functools import lru_cache

import redis
from celery import Celery, shared_task
from celery.worker.control import control_command

DEFAULT_QUEUE = "compat"
BEAT_INTERVAL = 1.0  # seconds between two runs of the beat entry


class Flaky(Exception):
    """Raised by the retry tasks until they are allowed to succeed."""


@lru_cache(maxsize=None)
def store(url: str) -> redis.Redis:
    """A client of the broker's Redis, where tasks write their traces."""
    return redis.Redis.from_url(url, decode_responses=True)


def trace(task, key: str, **extra) -> int:
    """Record one run of `task` on the list `key`; returns how many runs the list now holds."""
    request = task.request
    line = {"id": request.id, "time": time.time(), "pid": os.getpid(), "hostname": request.hostname,
            "routing_key": (request.delivery_info or {}).get("routing_key"),
            "retries": request.retries, **extra}
    return store(task.app.conf.broker_url).rpush(key, json.dumps(line))


def wait_for_key(task, key: str, timeout: float) -> bool:
    """Wait (polling) until `key` exists in the broker's Redis; False when `timeout` passed first."""
    client = store(task.app.conf.broker_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.exists(key):
            return True
        time.sleep(0.05)
    return False


def create_app(broker_url: str, visibility_timeout: float | None = None, beat_queue: str | None = None,
               beat_key: str = "compat:beat") -> Celery:
    """The compatibility app on `broker_url` (results on the same server and database).

    `visibility_timeout`: seconds before an unacknowledged message goes back to its queue, with the
    workers sweeping for such messages every second (for the redelivery scenario).
    `beat_queue`: beat sends one entry, `compat.beat_tick`, to this queue every `BEAT_INTERVAL`
    (its runs are traced on the list `beat_key`).
    """
    app = Celery("compat", set_as_current=False)
    transport: dict = {}
    if visibility_timeout is not None:
        transport = {"visibility_timeout": visibility_timeout, "unacked_restore_interval": 1,
                     "unacked_restore_throttle": 1, "unacked_mutex_expire": 5}
    app.conf.update(
        broker_url=broker_url,
        result_backend=broker_url,
        broker_transport_options=transport,
        result_backend_transport_options={},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=DEFAULT_QUEUE,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        result_expires=3600,
        enable_utc=True,
        beat_schedule={} if beat_queue is None else {
            "compat-tick": {"task": "compat.beat_tick", "schedule": timedelta(seconds=BEAT_INTERVAL),
                            "args": [beat_key], "options": {"queue": beat_queue}},
        },
    )
    return app


@shared_task(name="compat.add")
def add(x, y):
    return x + y


@shared_task(name="compat.mul")
def mul(x, y):
    return x * y


@shared_task(name="compat.tsum")
def tsum(values):
    return sum(values)


@shared_task(name="compat.record", bind=True)
def record(self, key, value=None):
    trace(self, key, value=value)
    return value


@shared_task(name="compat.boom")
def boom(message):
    raise ValueError(message)


@shared_task(name="compat.block", bind=True)
def block(self, key, release_key):
    """Run until the test creates `release_key` (for `inspect().active`)."""
    trace(self, key)
    return "released" if wait_for_key(self, release_key, 60) else "timed out"


def _flaky_run(task, key: str, succeed_on: int) -> int:
    runs = trace(task, key)
    if runs < succeed_on:
        raise Flaky(f"run {runs} of {succeed_on}")
    return runs


RETRY = {"autoretry_for": (Flaky,), "retry_backoff": 1, "retry_backoff_max": 60, "retry_jitter": False}


@shared_task(name="compat.flaky", bind=True, max_retries=3, **RETRY)
def flaky(self, key, succeed_on):
    """Fails until its `succeed_on`-th run; retried with exponential backoff (1 s, 2 s, 4 s)."""
    return _flaky_run(self, key, succeed_on)


@shared_task(name="compat.flaky_once", bind=True, max_retries=1, **RETRY)
def flaky_once(self, key, succeed_on):
    """As `flaky`, retried once only."""
    return _flaky_run(self, key, succeed_on)


@shared_task(name="compat.crash_once", bind=True, acks_late=True)
def crash_once(self, key, hold_key):
    """Acknowledged late: the first run holds (until its worker is killed), a later one finishes."""
    runs = trace(self, key)
    if runs == 1:
        wait_for_key(self, hold_key, 120)
        return "first run finished"
    return f"run {runs}"


@shared_task(name="compat.limited", bind=True, rate_limit="120/m")
def limited(self, key):
    trace(self, key)


@shared_task(name="compat.beat_tick", bind=True)
def beat_tick(self, key):
    trace(self, key)


@control_command(args=[("key", str), ("value", str)], signature="<key> <value>")
def compat_mark(state, key: str, value: str) -> dict:
    """A custom broadcast command: sets `key` in the broker's Redis, answers with the node's name."""
    store(state.consumer.app.conf.broker_url).set(key, f"{value}@{state.hostname}")
    return {"ok": state.hostname, "host": socket.gethostname()}


app = create_app(
    os.environ.get("COMPAT_BROKER_URL", "memory://"),
    visibility_timeout=float(os.environ["COMPAT_VISIBILITY_TIMEOUT"]) if os.environ.get("COMPAT_VISIBILITY_TIMEOUT")
    else None,
    beat_queue=os.environ.get("COMPAT_BEAT_QUEUE") or None,
    beat_key=os.environ.get("COMPAT_BEAT_KEY", "compat:beat"),
)
