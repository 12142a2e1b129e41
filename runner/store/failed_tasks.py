"""The failed_tasks table, the seed's dead letters: a task that failed for good (its retries
exhausted, or an error no retry can fix) is written here with what is needed to send it again.
Nothing is re-queued by itself; `dify-local failed retry ID` does it on request."""

from __future__ import annotations

import json
import time
from typing import Any

from runner.store.database import Database
from runner.store.task_runs import to_json

TRACEBACK_LIMIT = 20000  # characters kept of a traceback (its end: where it failed)
COLUMNS = ("id", "task_id", "name", "queue", "args", "kwargs", "error", "traceback", "retries", "worker",
           "failed_at", "retried_at", "retry_task_id")


def record_failure(database: Database, *, task_id: str, name: str, queue: str | None, args: Any, kwargs: Any,
                   error: str, traceback: str | None, retries: int, worker: str | None) -> int:
    """Write one dead letter; returns its id."""
    if traceback and len(traceback) > TRACEBACK_LIMIT:
        traceback = "…" + traceback[-TRACEBACK_LIMIT:]
    with database.transaction() as db:
        cursor = db.execute(
            "INSERT INTO failed_tasks (task_id, name, queue, args, kwargs, error, traceback, retries, worker, "
            "failed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [task_id, name, queue, to_json(list(args or [])), to_json(dict(kwargs or {})), error[:4000], traceback,
             retries, worker, time.time()])
        return cursor.lastrowid


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    for key in ("args", "kwargs"):
        try:
            row[key] = json.loads(row[key])
        except (TypeError, ValueError):
            pass
    return row


def list_failures(database: Database, include_retried: bool = True, limit: int = 100) -> list[dict[str, Any]]:
    """The latest dead letters first."""
    where = "" if include_retried else "WHERE retried_at IS NULL"
    with database.connect() as db:
        rows = db.query(f"SELECT * FROM failed_tasks {where} ORDER BY id DESC LIMIT ?", [limit])
        return [_decoded(row) for row in rows]


def get_failure(database: Database, failure_id: int) -> dict[str, Any] | None:
    with database.connect() as db:
        rows = list(db.query("SELECT * FROM failed_tasks WHERE id = ?", [failure_id]))
    return _decoded(rows[0]) if rows else None


def mark_retried(database: Database, failure_id: int, retry_task_id: str) -> None:
    with database.transaction() as db:
        db.execute("UPDATE failed_tasks SET retried_at = ?, retry_task_id = ? WHERE id = ?",
                   [time.time(), retry_task_id, failure_id])
