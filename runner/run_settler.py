"""Rows of task_runs that fell behind what ran, settled from the result backend.

A worker's recorder keeps its events in memory for a moment before writing them (runner.store.task_runs);
a worker killed with -9 takes the unwritten ones along. Its tasks' rows then say STARTED (or PENDING)
for ever, while the result backend, written before the message is acked, says SUCCESS or FAILURE.
Each worker settles such rows when it is ready, GRACE seconds later, and every SETTLE_INTERVAL
seconds after: a row still PENDING or STARTED whose recording worker is not alive and whose result
has been final for more than GRACE seconds takes the backend's state and time. A row whose task is
still in a queue or held by a worker (the broker's unacked hash) is left alone: it will run again and
be recorded then.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from datetime import datetime
from typing import Any, Iterable

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from runner import topology
from runner.broker_config import WORKER_HEARTBEAT_PREFIX, broker_connection

log = logging.getLogger("dify_local.worker")

SETTLE_INTERVAL = 60.0  # seconds between settlements, after the one when the worker is ready
# Seconds a result must have been final before its row is settled: a live recorder writes within
# a fraction of a second (its flush interval), so a row still behind after this has lost its writer.
GRACE = 10.0
CANDIDATES = 5000  # rows looked at per settlement, newest first: bounds the work after a long outage
FINAL = ("SUCCESS", "FAILURE")
SCAN_CHUNK = 1000  # messages read per LRANGE while looking for tasks still queued

SETTLE_SQL = """
UPDATE task_runs SET
    state = ?,
    finished_at = ?,
    runtime = CASE WHEN started_at IS NOT NULL THEN ? - started_at ELSE runtime END,
    error = COALESCE(?, error),
    attempts = MAX(attempts, 1)
WHERE id = ? AND state IN ('PENDING', 'STARTED')
"""


# A Celery message's task id, found without decoding the whole message (its arguments are in the
# base64 body; an "id" inside a header's text is escaped, \"id\", so it does not match).
TASK_ID = re.compile(rb'"id": ?"([^"\\]+)"')


def _task_ids(messages: Iterable[bytes], wanted: set[str], unwrap: bool) -> set[str]:
    """The ids among `wanted` of these raw kombu messages (in the unacked hash: [message, exchange, key])."""
    found = set()
    for raw in messages:
        match = TASK_ID.search(raw) if isinstance(raw, bytes) else None
        if match:
            task_id = match.group(1).decode("utf-8", "replace")
            if task_id in wanted:
                found.add(task_id)
            continue
        try:
            message = json.loads(raw)
            if unwrap:
                message = message[0]
            task_id = message["headers"]["id"]
        except (ValueError, KeyError, IndexError, TypeError):  # not a Celery message: not ours to judge
            continue
        if task_id in wanted:
            found.add(task_id)
    return found


def _still_delivered(channel, wanted: set[str]) -> set[str]:
    """The tasks among `wanted` whose message is still in a queue or held unacked by a worker."""
    client = channel.client
    found = _task_ids(client.hvals(channel.unacked_key), wanted, unwrap=True)
    for queue in topology.QUEUE_NAMES:
        for priority in channel.priority_steps:
            key = channel._q_for_pri(queue, priority)
            start = 0
            while found != wanted:
                chunk = client.lrange(key, start, start + SCAN_CHUNK - 1)
                found |= _task_ids(chunk, wanted, unwrap=False)
                if len(chunk) < SCAN_CHUNK:
                    break
                start += SCAN_CHUNK
    return found


def _error(meta: dict[str, Any]) -> str | None:
    if meta.get("status") != "FAILURE":
        return None
    result = meta.get("result")  # decode_result makes the exception again (a class of its name if unknown)
    if isinstance(result, BaseException):
        return f"{type(result).__name__}: {result}"[:4000]
    if isinstance(result, dict) and "exc_type" in result:
        message = result.get("exc_message")
        if isinstance(message, (list, tuple)):
            message = " ".join(str(part) for part in message)
        return f"{result['exc_type']}: {message}"[:4000]
    return str(result)[:4000]


def _done_at(meta: dict[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(meta["date_done"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


def settle_task_runs(app: Celery, node: str | None = None, started_before: float | None = None) -> int:
    """Settle the rows that fell behind; returns how many were. `node` is this worker's name and
    `started_before` when it started: its rows from before then are a previous incarnation's (a
    restarted worker keeps its name, and its heartbeat)."""
    database = app.dify.database
    with database.connect() as db:
        rows = list(db.query("SELECT id, worker, started_at FROM task_runs WHERE state IN ('PENDING', 'STARTED') "
                             "ORDER BY rowid DESC LIMIT ?", [CANDIDATES]))
    if not rows:
        return 0
    with broker_connection(app.dify.settings, timeout=5) as connection:
        channel = connection.default_channel
        workers = sorted({row["worker"] for row in rows if row["worker"]})
        beating = dict(zip(workers, channel.client.mget([WORKER_HEARTBEAT_PREFIX + name for name in workers])
                           if workers else [], strict=True))

        def gone(row: dict) -> bool:
            worker = row["worker"]
            if worker is None:  # never recorded as started: whoever ran it did not get to write
                return True
            if worker == node and started_before is not None and (row["started_at"] or 0) < started_before:
                return True
            return beating.get(worker) is None
        rows = [row for row in rows if gone(row)]
        if not rows:
            return 0
        backend = app.backend
        values = backend.mget([backend.get_key_for_task(row["id"]) for row in rows])
        now = time.time()
        settled: dict[str, tuple[dict, float]] = {}
        for row, value in zip(rows, values, strict=True):
            if value is None:
                continue
            try:
                meta = backend.decode_result(value)
            except Exception:  # not a result Celery wrote: leave the row as it is
                continue
            done = _done_at(meta)
            if meta.get("status") in FINAL and done is not None and now - done > GRACE:
                settled[row["id"]] = (meta, done)
        if not settled:
            return 0
        for task_id in _still_delivered(channel, set(settled)):
            del settled[task_id]
    with database.transaction() as db:
        db.conn.executemany(SETTLE_SQL, [(meta["status"], done, done, _error(meta), task_id)
                                         for task_id, (meta, done) in settled.items()])
    return len(settled)


class RunSettler:
    """A daemon thread of the worker: settles once when it is ready, then every SETTLE_INTERVAL."""

    def __init__(self, app: Celery, interval: float = SETTLE_INTERVAL):
        self.app = app
        self.interval = interval
        self.started_at = time.time()  # before this process ran any task
        self.stopped = threading.Event()
        self.node: str | None = None

    def ready(self, sender=None, **_) -> None:
        self.node = getattr(sender, "hostname", None)
        threading.Thread(target=self._run, name="task-run-settler", daemon=True).start()

    def stop(self, **_) -> None:
        self.stopped.set()

    def _run(self) -> None:
        # The pass when ready leaves the results of the last GRACE seconds before the restart (a
        # worker just killed): one more pass once those are past it, then every interval.
        waits = iter([GRACE + 1.0])
        while not self.stopped.is_set():
            began = time.perf_counter()
            try:
                count = settle_task_runs(self.app, self.node, self.started_at)
            except Exception as error:  # the broker or the database away: try again next time
                log.warning("could not settle task runs: %s: %s", type(error).__name__, error)
            else:
                if count:
                    log.info("settled %d task run(s) whose worker stopped before recording their end "
                             "(from the result backend, in %.0f ms)", count, (time.perf_counter() - began) * 1000)
            self.stopped.wait(next(waits, self.interval))


def install_run_settler(app: Celery) -> RunSettler:
    settler = RunSettler(app)
    worker_ready.connect(settler.ready, weak=False)
    worker_shutdown.connect(settler.stop, weak=False)
    return settler
