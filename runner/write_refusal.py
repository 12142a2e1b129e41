"""The broker refusing writes (Redis' MISCONF: the embedded broker's log, or a Redis' AOF or RDB
file, cannot be written, usually because the disk is full), and waiting that out.

redis-py answers MISCONF with a plain ResponseError; `register()` makes it a BrokerRefusesWrites
(still a ResponseError to everyone else), so the processes that must carry on once there is room
again (the worker, beat) can tell it from a real error, and the API can say what it is. A refused
write took no effect, so trying it again is safe: `WaitingRedis` does that for every command and
transaction of the clients kombu and the result backend make in those processes (the unacked
index, acks, results, heartbeats, sends), saying once that it waits and once that it carries on.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, TypeVar

import redis
from redis._parsers.base import BaseParser
from redis.client import Pipeline

from runner.broker_config import error_chain

log = logging.getLogger("dify_local.broker_writes")

T = TypeVar("T")
FIRST_PAUSE = 0.1  # seconds; doubled after each refusal up to LONGEST_PAUSE
LONGEST_PAUSE = 1.0
WAITING = "the broker refuses writes: its disk is full (MISCONF); waiting"
RESUMED = "the broker accepts writes again: carrying on"


class BrokerRefusesWrites(redis.ResponseError):
    """MISCONF: the broker cannot write its append-only log (or snapshot) and refuses writes."""


def register() -> None:
    """Have redis-py raise BrokerRefusesWrites for MISCONF replies, in this process (idempotent).
    Its parsers look error codes up in this table (hiredis' as well)."""
    BaseParser.EXCEPTION_CLASSES.setdefault("MISCONF", BrokerRefusesWrites)


def refused_writes(error: BaseException | None) -> BaseException | None:
    """The MISCONF refusal behind `error` (kombu wraps redis-py's errors in its own), if it is one."""
    for link in error_chain(error):
        if isinstance(link, BrokerRefusesWrites) or str(link).startswith("MISCONF"):
            return link
    return None


def refusal_in(persistence: dict[str, Any]) -> str | None:
    """Why a broker refuses writes, from its INFO persistence (its append-only file's last write
    failed, as Redis reports it), or None when it takes them."""
    if persistence.get("aof_last_write_status") != "err":
        return None
    why = str(persistence.get("aof_last_error") or "its log cannot be written")
    return f"refusing writes: {'disk full' if 'No space' in why else 'its log cannot be written'} (MISCONF: {why})"


def _stopping() -> bool:
    """A worker being stopped gives up waiting: its task's message stays unacknowledged and goes
    back to its queue, so stopping never has to wait for disk space."""
    try:
        from celery.worker import state
    except ImportError:  # pragma: no cover - Celery is always installed with dify-local
        return False
    return bool(state.should_stop or state.should_terminate)


class WriteWait:
    """This process's waits for the broker to accept writes: said once when the first begins, and
    once when one ends (the broker took a write again), however many threads wait."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waiting = False

    def refused(self, error: BaseException) -> None:
        with self._lock:
            if self.waiting:
                return
            self.waiting = True
        log.warning("%s (%s)", WAITING, str(error).split(";")[0])

    def accepted(self) -> None:
        if not self.waiting:
            return
        with self._lock:
            if not self.waiting:
                return
            self.waiting = False
        log.warning(RESUMED)


WAIT = WriteWait()


def wait_out(call: Callable[[], T], stopping: Callable[[], bool] = _stopping) -> T:
    """`call()`, tried again while the broker refuses writes, with pauses of up to LONGEST_PAUSE."""
    pause = 0.0
    while True:
        try:
            result = call()
        except BrokerRefusesWrites as error:
            if stopping():
                raise
            WAIT.refused(error)
            pause = min(LONGEST_PAUSE, pause * 2 or FIRST_PAUSE)
            time.sleep(pause)
            continue
        if pause:
            WAIT.accepted()
        return result


class WaitingPipeline(Pipeline):
    def execute(self, raise_on_error: bool = True) -> list[Any]:
        # redis-py empties the stack after each try, refused or not: each try gets its own copy
        stack, scripts = list(self.command_stack), set(self.scripts)

        def attempt() -> list[Any]:
            self.command_stack, self.scripts = list(stack), set(scripts)
            return Pipeline.execute(self, raise_on_error)
        return wait_out(attempt)


class WaitingRedis(redis.Redis):
    """redis-py's client, waiting while the broker refuses writes instead of raising."""

    def execute_command(self, *args, **options):
        return wait_out(lambda: super(WaitingRedis, self).execute_command(*args, **options))

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> WaitingPipeline:
        return WaitingPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
