"""What every task module shares: the task decorator and the per-process context."""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable

from celery import shared_task

from runner.context import AppContext
from runner.errors import StateError
from runner.topology import ROUTES

DAY = 86400  # seconds


# Errors that say the input is wrong (a bad address, a missing row, an invalid graph), or that the
# state folder holds what only the user can fix (a link, a corrupt database): running the task again
# cannot help, so it fails at once and goes to the failed tasks (`dify-local failed retry` once fixed).
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (ValueError, LookupError, TypeError, StateError)

# The seed: a failed task is retried with exponential backoff, configurable per task. Celery's
# autoretry waits a random 0..2^n s before retry n+1 (1 s base, "full jitter", at most
# retry_backoff_max); once max_retries are spent the task fails and is recorded as a dead letter
# (runner.dead_letters). A task overrides any of these: task("name", max_retries=0).
RETRY_POLICY: dict[str, Any] = {
    "autoretry_for": (Exception,),
    "dont_autoretry_for": PERMANENT_ERRORS,
    "retry_backoff": True,
    "retry_backoff_max": 600,
    "retry_jitter": True,
    "max_retries": 3,
}


def task(name: str, **options: Any) -> Callable:
    """A bound shared task named `name` with the retry policy; the name must have a route in the topology."""
    if name not in ROUTES:
        raise LookupError(f"task {name!r} has no route in runner/topology.py ROUTES")
    return shared_task(name=name, bind=True, **{**RETRY_POLICY, **options})


def context(bound_task: Any) -> AppContext:
    return bound_task.app.dify


def new_id() -> str:
    return str(uuid.uuid4())


def now() -> float:
    return time.time()


def row_by_id(db: Any, table: str, row_id: str, what: str, columns: str = "*") -> dict:
    """The row of `table` with this id, or LookupError naming what is missing."""
    rows = list(db.query(f"SELECT {columns} FROM {table} WHERE id = ?", [row_id]))
    if not rows:
        raise LookupError(f"no {what} {row_id!r}")
    return rows[0]


def delete_older_than(ctx: AppContext, table: str, column: str, days: int) -> dict:
    """Retention: remove the rows whose `column` (a UNIX time) is more than `days` days old."""
    with ctx.database.transaction() as db:
        cursor = db.execute(f"DELETE FROM {table} WHERE {column} < ?", [now() - days * DAY])
    return {"removed": cursor.rowcount, "older_than_days": days}
