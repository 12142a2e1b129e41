"""Retention (queue retention, served after every other class): removing old records."""

from __future__ import annotations

from runner.tasks.base import context, delete_older_than, task


@task("clean_task_runs_task")
def clean_task_runs_task(self, days: int = 30) -> dict:
    """Remove records of task runs that finished more than `days` days ago."""
    return delete_older_than(context(self), "task_runs", "finished_at", days)
