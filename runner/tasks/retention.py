"""Retention (queue retention, served after every other class): removing old records, expired
tokens, temporary files, rotated logs and old queue depth samples."""

from __future__ import annotations

from runner.file_retention import ROTATED_LOG, remove_older_than
from runner.store.queue_samples import prune_samples
from runner.tasks.base import DAY, context, delete_older_than, now, task

HOUR = 3600  # seconds


@task("clean_task_runs_task")
def clean_task_runs_task(self, days: int = 30) -> dict:
    """Remove records of task runs that finished more than `days` days ago."""
    return delete_older_than(context(self), "task_runs", "finished_at", days)


@task("clean_expired_tokens_task")
def clean_expired_tokens_task(self) -> dict:
    """Remove one-time tokens (password-reset codes) past their expiry."""
    with context(self).database.transaction() as db:
        cursor = db.execute("DELETE FROM tokens WHERE expires_at < ?", [now()])
    return {"removed": cursor.rowcount}


@task("clean_temp_files_task")
def clean_temp_files_task(self) -> dict:
    """Remove temporary files older than DIFY_LOCAL_TEMP_FILE_HOURS from the state folder's files/tmp."""
    ctx = context(self)
    hours = ctx.settings.DIFY_LOCAL_TEMP_FILE_HOURS
    return {**remove_older_than(ctx.paths.root, ctx.paths.temp, now() - hours * HOUR), "older_than_hours": hours}


@task("clean_old_logs_task")
def clean_old_logs_task(self) -> dict:
    """Remove rotated log files (NAME.log.1 …) older than DIFY_LOCAL_LOG_RETENTION_DAYS; live logs stay."""
    ctx = context(self)
    days = ctx.settings.DIFY_LOCAL_LOG_RETENTION_DAYS
    removed = remove_older_than(ctx.paths.root, ctx.paths.logs, now() - days * DAY, ROTATED_LOG)
    return {**removed, "older_than_days": days}


@task("clean_queue_samples_task")
def clean_queue_samples_task(self) -> dict:
    """Remove queue depth samples older than DIFY_LOCAL_QUEUE_SAMPLE_RETENTION_HOURS (beat runs it hourly)."""
    ctx = context(self)
    hours = ctx.settings.DIFY_LOCAL_QUEUE_SAMPLE_RETENTION_HOURS
    return {"removed": prune_samples(ctx.database, now() - hours * HOUR), "older_than_hours": hours}
