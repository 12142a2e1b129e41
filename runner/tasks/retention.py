"""Retention (queue retention, served after every other class): removing old records."""

from __future__ import annotations

from runner.tasks.base import context, now, task

DAY = 86400


@task("clean_task_runs_task")
def clean_task_runs_task(self, days: int = 30) -> dict:
    """Remove records of task runs that finished more than `days` days ago."""
    with context(self).database.transaction() as db:
        cursor = db.execute("DELETE FROM task_runs WHERE finished_at < ?", [now() - days * DAY])
    return {"removed": cursor.rowcount, "older_than_days": days}
