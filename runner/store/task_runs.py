"""The task_runs table: written as tasks are sent, start and finish; read by the API.

Writes go through `TaskRunRecorder`, which queues them and commits them in batches from one
background thread. The worker's pool threads only append to a queue, so recording costs a task
microseconds instead of a SQLite commit, and many starts and finishes share one commit.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any

from runner.store.database import Database

log = logging.getLogger(__name__)

ARGS_LIMIT = 65536  # characters of JSON kept per argument list

# Later events never overwrite earlier facts they do not know: a start that arrives after its
# finish (or a send recorded after the start) keeps the finished state and timings.
QUEUED_SQL = """
INSERT INTO task_runs (id, name, queue, state, args, kwargs, queued_at)
VALUES (?, ?, ?, 'PENDING', ?, ?, ?)
ON CONFLICT(id) DO UPDATE SET queued_at = COALESCE(task_runs.queued_at, excluded.queued_at),
    queue = COALESCE(task_runs.queue, excluded.queue)
"""
STARTED_SQL = """
INSERT INTO task_runs (id, name, queue, state, args, kwargs, worker, attempts, started_at)
VALUES (?, ?, ?, 'STARTED', ?, ?, ?, 1, ?)
ON CONFLICT(id) DO UPDATE SET
    state = CASE WHEN task_runs.finished_at IS NULL OR task_runs.state = 'RETRY' THEN 'STARTED' ELSE task_runs.state END,
    queue = COALESCE(excluded.queue, task_runs.queue),
    args = COALESCE(task_runs.args, excluded.args), kwargs = COALESCE(task_runs.kwargs, excluded.kwargs),
    worker = excluded.worker, attempts = task_runs.attempts + 1,
    started_at = excluded.started_at, finished_at = NULL, runtime = NULL
"""
FINISHED_SQL = """
UPDATE task_runs SET state = ?, finished_at = ?, runtime = ? - started_at, error = COALESCE(?, error)
WHERE id = ?
"""
FAILED_SQL = "UPDATE task_runs SET error = ? WHERE id = ?"


def to_json(value: Any) -> str:
    text = json.dumps(value, default=repr, ensure_ascii=False)
    return text if len(text) <= ARGS_LIMIT else json.dumps({"truncated": text[:ARGS_LIMIT]})


class TaskRunRecorder:
    """Queues task_runs writes and commits them in batches from a daemon thread."""

    def __init__(self, database: Database, flush_interval: float = 0.05):
        self.database = database
        self.flush_interval = flush_interval
        self._queue: queue.SimpleQueue[tuple[str, tuple] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- producers (any thread) ------------------------------------------------------------------

    def queued(self, task_id: str, name: str, queue_name: str | None, args: Any, kwargs: Any) -> None:
        self._put(QUEUED_SQL, (task_id, name, queue_name, to_json(args), to_json(kwargs), time.time()))

    def started(self, task_id: str, name: str, queue_name: str | None, args: Any, kwargs: Any,
                worker: str | None) -> None:
        self._put(STARTED_SQL, (task_id, name, queue_name, to_json(args), to_json(kwargs), worker, time.time()))

    def failed(self, task_id: str, error: str) -> None:
        self._put(FAILED_SQL, (error[:4000], task_id))

    def finished(self, task_id: str, state: str, error: str | None = None) -> None:
        now = time.time()
        self._put(FINISHED_SQL, (state, now, now, error, task_id))

    def _put(self, sql: str, params: tuple) -> None:
        if self._thread is None:
            self.start()
        self._queue.put((sql, params))

    # -- the writer --------------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="task-run-recorder", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write everything queued so far, then stop the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            deadline = time.monotonic() + self.flush_interval
            while item is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                batch.append(item)
            writes = [entry for entry in batch if entry is not None]
            if writes:
                self._write(writes)
            if batch[-1] is None:
                return

    def _write(self, writes: list[tuple[str, tuple]]) -> None:
        try:
            with self.database.transaction() as db:
                for sql, params in writes:
                    db.conn.execute(sql, params)
        except Exception:  # the record is a log: losing a batch must never stop the worker
            log.exception("could not record %d task run event(s) in %s", len(writes), self.database.path)


def get_task_run(database: Database, task_id: str) -> dict[str, Any] | None:
    with database.connect() as db:
        rows = list(db.query("SELECT * FROM task_runs WHERE id = ?", [task_id]))
    return rows[0] if rows else None
