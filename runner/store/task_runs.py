"""The task_runs table: written as tasks are sent, start and finish; read by the API.

Writes go through `TaskRunRecorder`: the signal handlers only append an event to a queue, and one
background thread folds each batch's events into one row per task and upserts them with a single
`executemany` in one commit. A trivial task's start and finish usually land in the same batch, so
a task costs the worker one row written in bulk rather than two statements and a commit.
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
COLUMNS = ("id", "name", "queue", "state", "args", "kwargs", "worker", "attempts", "queued_at", "started_at",
           "finished_at", "runtime", "error")

# One row per task per batch, merged with what earlier batches (or other processes) wrote:
# - the send is recorded by the sending process, which may write after the worker: it never
#   overrides the worker's state or timings (state PENDING, queued_at only where none);
# - a start clears an earlier finish (a retry runs again), a finish sets the runtime.
UPSERT_SQL = f"""
INSERT INTO task_runs ({", ".join(COLUMNS)}) VALUES ({", ".join("?" * len(COLUMNS))})
ON CONFLICT(id) DO UPDATE SET
    name = COALESCE(task_runs.name, excluded.name),
    queue = COALESCE(excluded.queue, task_runs.queue),
    state = CASE WHEN excluded.state = 'PENDING' THEN task_runs.state ELSE excluded.state END,
    args = COALESCE(task_runs.args, excluded.args),
    kwargs = COALESCE(task_runs.kwargs, excluded.kwargs),
    worker = COALESCE(excluded.worker, task_runs.worker),
    attempts = task_runs.attempts + excluded.attempts,
    queued_at = COALESCE(task_runs.queued_at, excluded.queued_at),
    started_at = COALESCE(excluded.started_at, task_runs.started_at),
    finished_at = CASE WHEN excluded.started_at IS NOT NULL AND excluded.finished_at IS NULL THEN NULL
                       ELSE COALESCE(excluded.finished_at, task_runs.finished_at) END,
    runtime = CASE WHEN excluded.finished_at IS NOT NULL
                       THEN excluded.finished_at - COALESCE(excluded.started_at, task_runs.started_at)
                   WHEN excluded.started_at IS NOT NULL THEN NULL
                   ELSE task_runs.runtime END,
    error = COALESCE(excluded.error, task_runs.error)
"""


def _encodable(text: str) -> bool:
    if text.isascii():  # nearly every value: no trial encoding on the recorder's path
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def to_json(value: Any) -> str:
    text = json.dumps(value, default=repr, ensure_ascii=False)
    if not _encodable(text):
        # A lone surrogate (a str decoded from bytes that are not UTF-8): SQLite keeps text as UTF-8,
        # which cannot hold it; JSON's \uXXXX escape keeps it exactly.
        text = json.dumps(value, default=repr)
    return text if len(text) <= ARGS_LIMIT else json.dumps({"truncated": text[:ARGS_LIMIT]})


def storable(value: Any) -> Any:
    """`value` as SQLite can store it: text that UTF-8 cannot hold gets backslash escapes."""
    if isinstance(value, str) and not _encodable(value):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _fold(events: list[tuple[str, str, dict[str, Any]]]) -> list[tuple]:
    """Events in the order they happened → one row of COLUMNS per task."""
    rows: dict[str, dict[str, Any]] = {}
    for kind, task_id, fields in events:
        row = rows.get(task_id)
        if row is None:
            row = rows[task_id] = {"id": task_id, "attempts": 0}
        if kind == "queued":
            for key in ("name", "queue", "args", "kwargs", "queued_at"):
                row.setdefault(key, fields[key])
            row.setdefault("state", "PENDING")
        elif kind == "started":
            row.update(fields, state="STARTED", attempts=row["attempts"] + 1, finished_at=None, runtime=None)
        elif kind == "failed":
            row.update(fields, state="FAILURE")
        else:  # finished
            row.update(fields)
            if row.get("started_at") is not None:
                row["runtime"] = row["finished_at"] - row["started_at"]
    return [tuple(storable(row.get(column)) for column in COLUMNS) for row in rows.values()]


class TaskRunRecorder:
    """Queues task_runs events and writes them in batches from a daemon thread."""

    def __init__(self, database: Database, flush_interval: float = 0.05):
        self.database = database
        self.flush_interval = flush_interval
        self._queue: queue.SimpleQueue[tuple[str, str, dict] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- producers (any thread) ------------------------------------------------------------------

    def queued(self, task_id: str, name: str, queue_name: str | None, args: Any, kwargs: Any) -> None:
        self._put("queued", task_id, {"name": name, "queue": queue_name, "args": to_json(args),
                                      "kwargs": to_json(kwargs), "queued_at": time.time()})

    def started(self, task_id: str, name: str, queue_name: str | None, args: Any, kwargs: Any,
                worker: str | None) -> None:
        self._put("started", task_id, {"name": name, "queue": queue_name, "args": to_json(args),
                                       "kwargs": to_json(kwargs), "worker": worker, "started_at": time.time()})

    def failed(self, task_id: str, name: str, error: str) -> None:
        self._put("failed", task_id, {"name": name, "error": error[:4000]})

    def finished(self, task_id: str, name: str, state: str) -> None:
        self._put("finished", task_id, {"name": name, "state": state, "finished_at": time.time()})

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's writer thread did not come along; start afresh."""
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._lock = threading.Lock()

    def _put(self, kind: str, task_id: str, fields: dict[str, Any]) -> None:
        if self._thread is None:
            self.start()
        self._queue.put((kind, task_id, fields))

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
            batch = [self._queue.get()]
            if batch[0] is not None:
                # One sleep, then take whatever came meanwhile without blocking: waking for every
                # event (a thousand times a second under load) costs the pool threads the GIL.
                time.sleep(self.flush_interval)
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            events = [entry for entry in batch if entry is not None]
            if events:
                self._write(events)
            if None in batch:
                return

    def _write(self, events: list[tuple[str, str, dict]]) -> None:
        # The record is a log: nothing here may stop the worker, and one bad row must not cost the
        # rows beside it. The batch is one statement; should it fail, each row is tried on its own.
        try:
            rows = _fold(events)
        except Exception:
            log.exception("could not fold %d task run event(s)", len(events))  # a bug here: say where
            return
        try:
            with self.database.transaction() as db:
                db.conn.executemany(UPSERT_SQL, rows)
            return
        except Exception as error:
            first = error
        bad: list[str] = []
        try:
            with self.database.transaction() as db:
                for row in rows:
                    try:
                        db.conn.execute("SAVEPOINT task_run")
                        db.conn.execute(UPSERT_SQL, row)
                        db.conn.execute("RELEASE task_run")
                    except Exception as error:
                        db.conn.execute("ROLLBACK TO task_run")
                        db.conn.execute("RELEASE task_run")
                        bad.append(f"{row[0]!r} ({type(error).__name__}: {error})")
        except Exception as error:  # the database itself (locked, full, gone): the batch is lost
            log.warning("could not record %d task run event(s) in %s: %s: %s (first: %s)", len(events),
                        self.database.path, type(error).__name__, error, first)
            return
        if bad:
            log.warning("could not record the run of task %s in %s; the other %d were recorded",
                        "; ".join(bad)[:2000], self.database.path, len(rows) - len(bad))


def get_task_run(database: Database, task_id: str) -> dict[str, Any] | None:
    with database.connect() as db:
        rows = list(db.query("SELECT * FROM task_runs WHERE id = ?", [task_id]))
    return rows[0] if rows else None


def recent_task_runs(database: Database, limit: int, state: str | None = None) -> list[dict[str, Any]]:
    """The last `limit` task runs recorded (sent or started), newest first; only those in `state` if given.

    Newest by rowid: rows are inserted when a task is first recorded, so this needs no index and
    also finds tasks still waiting (no started_at yet)."""
    where, params = ("WHERE state = ?", [state]) if state else ("", [])
    with database.connect() as db:
        return list(db.query(f"SELECT * FROM task_runs {where} ORDER BY rowid DESC LIMIT ?", [*params, limit]))


def task_runs_by_id(database: Database, task_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The recorded runs of these tasks, by id (those never recorded are left out)."""
    found: dict[str, dict[str, Any]] = {}
    with database.connect() as db:
        for start in range(0, len(task_ids), 500):  # SQLite's limit on bound parameters
            chunk = task_ids[start:start + 500]
            marks = ", ".join("?" * len(chunk))
            found.update((row["id"], row) for row in db.query(f"SELECT * FROM task_runs WHERE id IN ({marks})", chunk))
    return found
