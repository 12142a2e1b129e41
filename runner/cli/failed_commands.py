"""`failed`: the tasks that failed for good (the seed's dead letters), read from the metadata store,
and sending one of them again. Listing and showing work with the stack down; a retry needs the broker."""

from __future__ import annotations

import datetime
import json
from typing import Any

import click

from runner.cli import fail, main, settings_from
from runner.cli.inspect_commands import table
from runner.settings.loader import IF_POSSIBLE
from runner.settings import Settings
from runner.store.database import Database

ERROR_WIDTH = 60  # characters of the error shown in the table


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _database(settings: Settings) -> Database | None:
    """The metadata store, migrated as the roles do; None when the stack never ran here."""
    from runner.state import StatePaths
    from runner.store import SchemaOutOfDate, prepare_database
    from runner.store.database import DatabaseBusy, PoolLimits

    path = StatePaths(settings.state_dir).database
    if not path.exists():
        return None
    database = Database(path, PoolLimits.from_settings(settings))
    try:
        prepare_database(database, migrate=settings.MIGRATION_ENABLED)
    except (SchemaOutOfDate, DatabaseBusy) as error:
        fail(str(error))
    return database


def _failure(settings: Settings, failure_id: int) -> tuple[Database, dict[str, Any]]:
    from runner.store.failed_tasks import get_failure

    database = _database(settings)
    row = get_failure(database, failure_id) if database else None
    if row is None:
        fail(f"no failed task {failure_id}; `dify-local failed` lists them")
    return database, row


ROW_ID = click.IntRange(1, 2**63 - 1)  # SQLite's INTEGER: a larger one cannot name a row (and overflows the query)


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--pending", is_flag=True, help="Only those not retried yet.")
@click.option("-n", "--limit", type=click.IntRange(1, 10000), default=100, show_default=True,
              help="How many, latest first.")
@click.pass_context
def failed(ctx: click.Context, as_json: bool, pending: bool, limit: int) -> None:
    """Tasks that failed for good: retries spent, or an error no retry can fix (latest first).

    `failed show ID` prints one with its arguments and traceback; `failed retry ID` sends it again."""
    if ctx.invoked_subcommand is not None:
        return
    from runner.store.failed_tasks import list_failures

    settings = settings_from(ctx)
    database = _database(settings)
    rows = list_failures(database, include_retried=not pending, limit=limit) if database else []
    if as_json:
        click.echo(json.dumps({"failed": rows}, indent=2, default=str))
        return
    if not rows:
        click.echo("no failed tasks" + ("" if database else f" (no metadata database in {settings.state_dir} yet)"))
        return
    lines = []
    for row in rows:
        error = row["error"] if len(row["error"]) <= ERROR_WIDTH else row["error"][:ERROR_WIDTH - 1] + "…"
        retried = f"retried {_when(row['retried_at'])} as {row['retry_task_id']}" if row["retried_at"] else "-"
        lines.append([row["id"], _when(row["failed_at"]), row["name"], row["queue"] or "-", row["retries"], error,
                      retried])
    click.echo(table(lines, ["ID", "FAILED AT (UTC)", "TASK", "QUEUE", "RETRIES", "ERROR", "RETRIED"]))


@failed.command("show")
@click.argument("failure_id", metavar="ID", type=ROW_ID)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def show(ctx: click.Context, failure_id: int, as_json: bool) -> None:
    """One failed task: its arguments, error and traceback."""
    _, row = _failure(settings_from(ctx), failure_id)
    if as_json:
        click.echo(json.dumps(row, indent=2, default=str))
        return
    for label, value in (("id", row["id"]), ("task", row["name"]), ("task id", row["task_id"]),
                         ("queue", row["queue"] or "-"), ("worker", row["worker"] or "-"),
                         ("failed at", f"{_when(row['failed_at'])} UTC"), ("retries", row["retries"]),
                         ("args", json.dumps(row["args"], ensure_ascii=False)),
                         ("kwargs", json.dumps(row["kwargs"], ensure_ascii=False)), ("error", row["error"]),
                         ("retried", f"{_when(row['retried_at'])} UTC as {row['retry_task_id']}"
                          if row["retried_at"] else "no")):
        click.echo(f"{label + ':':<11}{value}")
    if row["traceback"]:
        click.echo("\n" + row["traceback"].rstrip())


@failed.command("retry")
@click.argument("failure_id", metavar="ID", type=ROW_ID)
@click.pass_context
def retry(ctx: click.Context, failure_id: int) -> None:
    """Send a failed task again, with the same arguments to the same queue, and mark it retried."""
    from runner.store.failed_tasks import mark_retried

    settings = settings_from(ctx, make_password=IF_POSSIBLE)
    database, row = _failure(settings, failure_id)
    if not isinstance(row["args"], list) or not isinstance(row["kwargs"], dict):
        fail(f"failed task {failure_id}'s arguments were too large to keep whole; it cannot be sent again")
    new_id = _send(settings, row)
    mark_retried(database, failure_id, new_id)
    click.echo(f"sent {row['name']} again to {row['queue'] or 'its route'}: task id {new_id} "
               f"(failed task {failure_id} marked retried)")


def _send(settings: Settings, row: dict[str, Any]) -> str:
    from runner.broker_config import explain_broker_error
    from runner.celery_app import create_celery_app
    from runner.cli.broker_commands import connected
    from runner.recording import install_task_recording

    try:
        with connected(settings):
            pass
    except Exception as error:  # the broker down, refused, untrusted: one line
        fail(f"cannot send the task again: {explain_broker_error(error, settings, settings.broker_url)[1]}")
    app = create_celery_app(settings, register_tasks=False)
    recorder = install_task_recording(app)
    options = {"queue": row["queue"]} if row["queue"] else {}
    try:
        result = app.send_task(row["name"], args=row["args"], kwargs=row["kwargs"], **options)
    finally:
        recorder.stop()  # the send's record written before the command exits
    return result.id
