"""Reading per-task metrics: the task_metrics rows (one per task per hour, kept by triggers on
task_runs, see migration 0004_operations) summed over a window."""

from __future__ import annotations

import time
from typing import Any

from runner.store.database import Database

HOUR = 3600


def metrics_since(database: Database, hours: int, name: str | None = None) -> list[dict[str, Any]]:
    """Per task over the last `hours` whole hours (the current one included): attempts finished,
    succeeded, failed, retried, mean and max runtime in seconds; the busiest task first."""
    since = (int(time.time()) // HOUR - (hours - 1)) * HOUR
    where, params = "hour >= ?", [since]
    if name is not None:
        where, params = where + " AND name = ?", [since, name]
    with database.connect() as db:
        rows = db.query(
            "SELECT name, SUM(finished) AS finished, SUM(succeeded) AS succeeded, SUM(failed) AS failed, "
            "SUM(retried) AS retried, SUM(runtime_total) AS runtime_total, MAX(runtime_max) AS runtime_max "
            f"FROM task_metrics WHERE {where} GROUP BY name ORDER BY finished DESC, name", params)
        return [{"task": row["name"], "finished": row["finished"], "succeeded": row["succeeded"],
                 "failed": row["failed"], "retried": row["retried"],
                 "runtime_mean": round(row["runtime_total"] / row["finished"], 6) if row["finished"] else None,
                 "runtime_max": round(row["runtime_max"], 6)} for row in rows]
