"""The seed's run modes: `serve api|worker|beat|broker` (or `serve` with MODE=…), `migrate`, `job`."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import click

from runner.cli import CONFIG_ERROR, fail, main, settings_from
from runner.settings import Settings
from runner.settings.loader import ALWAYS, NEVER


ROLE_MODULES = {"api": "runner.roles.api", "worker": "runner.roles.worker", "beat": "runner.roles.beat",
                "broker": "runner.roles.broker"}


def _run_role(role: str, settings: Settings, **options) -> None:
    """Import only this role's module: the broker runs without Flask or Celery in memory.

    A failure before the role has loaded is also reported to `up` (with its file and line), which
    then keeps the process this one was to replace."""
    import importlib

    from runner.reload import child

    from runner.errors import EXIT_USER_MUST_FIX, StateError

    try:
        from runner.roles.common import RoleStartError

        module = importlib.import_module(ROLE_MODULES[role])
    except Exception as error:
        child.failed(error)
        raise
    try:
        getattr(module, f"serve_{role}")(settings, **options)
    except (RoleStartError, StateError) as error:
        user_must_fix = getattr(error, "user_must_fix", True)
        child.failed(error, code=False, user_must_fix=user_must_fix)
        fail(str(error), EXIT_USER_MUST_FIX if user_must_fix else 1)
    except Exception as error:
        child.failed(error)
        raise


@main.group(invoke_without_command=True)
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run one role of the stack in the foreground (what each Procfile line does).

    With no role named, MODE decides, as in Dify's entrypoint.
    """
    from runner.reload import child

    child.stand_by()  # a spare started by `up` for the next reload waits here, before reading settings
    if ctx.invoked_subcommand is not None:
        return
    settings = settings_from(ctx, follow_stack=False)
    if not settings.MODE:
        fail("name a role (api, worker, beat, broker) or set MODE", CONFIG_ERROR)
    if settings.MODE == "job":
        fail("MODE=job runs a one-off command: dify-local job -- COMMAND", CONFIG_ERROR)
    ctx.invoke(serve.commands[settings.MODE])


@serve.command("api")
@click.option("--host", help="Address to listen on (DIFY_BIND_ADDRESS).")
@click.option("--port", type=int, help="Port to listen on (DIFY_PORT).")
@click.pass_context
def serve_api(ctx: click.Context, host: str | None, port: int | None) -> None:
    """The Flask API; applies pending migrations first when MIGRATION_ENABLED."""
    settings = settings_from(ctx, follow_stack=False, make_password=ALWAYS, host=("--host", "DIFY_BIND_ADDRESS", host),
                             port=("--port", "DIFY_PORT", port))
    _run_role("api", settings)


AUTOSCALE = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*$")


@serve.command("worker")
@click.option("-Q", "--queues", help="Comma-separated queues to consume (CELERY_QUEUES); served by priority class.")
@click.option("-P", "--pool", help="threads, prefork, gevent or solo (CELERY_WORKER_CLASS).")
@click.option("-c", "--concurrency", help="Pool size (CELERY_WORKER_AMOUNT).")
@click.option("--autoscale", metavar="MAX,MIN", help="Autoscale the pool (CELERY_AUTO_SCALE, CELERY_MAX/MIN_WORKERS).")
@click.option("--prefetch-multiplier", help="Messages reserved per pool slot (CELERY_WORKER_PREFETCH_MULTIPLIER).")
@click.option("-n", "--hostname", help="Node name (default: the Procfile name @ host).")
@click.option("-l", "--loglevel", help="LOG_LEVEL for this worker.")
@click.option("-I", "--include", multiple=True, help="Extra task module to import (repeatable, or comma-separated).")
@click.pass_context
def serve_worker(ctx: click.Context, queues, pool, concurrency, autoscale, prefetch_multiplier, hostname, loglevel,
                 include) -> None:
    """A Celery worker on the configured queues (the seed's `-Q … -P threads -c 2` work here too)."""
    flags = dict(queues=("-Q", "CELERY_QUEUES", queues), pool=("-P", "CELERY_WORKER_CLASS", pool),
                 concurrency=("-c", "CELERY_WORKER_AMOUNT", concurrency),
                 prefetch=("--prefetch-multiplier", "CELERY_WORKER_PREFETCH_MULTIPLIER", prefetch_multiplier),
                 loglevel=("-l", "LOG_LEVEL", loglevel))
    if autoscale is not None:
        match = AUTOSCALE.match(autoscale)
        if not match:
            fail(f"--autoscale={autoscale!r} is not allowed: MAX,MIN as two whole numbers, e.g. 8,2", CONFIG_ERROR)
        flags.update(scale=("--autoscale", "CELERY_AUTO_SCALE", "true"),
                     ceiling=("--autoscale", "CELERY_MAX_WORKERS", match.group(1)),
                     floor=("--autoscale", "CELERY_MIN_WORKERS", match.group(2)))
    settings = settings_from(ctx, follow_stack=False, make_password=ALWAYS, **flags)
    from runner.topology import unknown_queue_problems  # our backend's worker: its 16 (CELERY_QUEUES is any app's)

    for problem in unknown_queue_problems(settings.CELERY_QUEUES, "-Q" if queues else "CELERY_QUEUES"):
        fail(problem, CONFIG_ERROR)
    modules = tuple(module.strip() for item in include for module in item.split(",") if module.strip())
    _run_role("worker", settings, hostname=hostname, include=modules)


@serve.command("beat")
@click.option("-l", "--loglevel", help="LOG_LEVEL for beat.")
@click.pass_context
def serve_beat(ctx: click.Context, loglevel: str | None) -> None:
    """Celery beat with Dify's periodic tasks (the ENABLE_* flags)."""
    _run_role("beat", settings_from(ctx, follow_stack=False, make_password=ALWAYS,
                                    loglevel=("-l", "LOG_LEVEL", loglevel)))


@serve.command("broker")
@click.option("--host", help="Address to listen on (REDIS_HOST).")
@click.option("--port", type=int, help="Port to listen on (REDIS_PORT).")
@click.option("--password", help="Password clients must give (REDIS_PASSWORD).")
@click.option("--no-password", is_flag=True, help="Let clients in without AUTH (loopback only).")
@click.option("--no-persist", is_flag=True, help="Keep the data in memory only (DIFY_LOCAL_BROKER_PERSIST=false).")
@click.pass_context
def serve_broker(ctx: click.Context, host: str | None, port: int | None, password: str | None, no_password: bool,
                 no_persist: bool) -> None:
    """The embedded Redis-protocol broker (fakeredis): durable, on loopback, password required."""
    settings = settings_from(ctx, follow_stack=False, make_password=NEVER if no_password else ALWAYS,
                             host=("--host", "REDIS_HOST", host), port=("--port", "REDIS_PORT", port),
                             password=("--password", "REDIS_PASSWORD", password),
                             persist=("--no-persist", "DIFY_LOCAL_BROKER_PERSIST", "false" if no_persist else None))
    _run_role("broker", settings, password=not no_password)


@main.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Apply pending migrations to the metadata database (Dify's upgrade-db)."""
    from runner.context import AppContext
    from runner.store.migrations import apply_migrations, schema_state

    settings = settings_from(ctx)
    database = AppContext(settings).database
    applied = apply_migrations(database)
    total = len(schema_state(database).applied)
    if applied:
        click.echo(f"applied {len(applied)} migration(s) to {database.path}: {', '.join(applied)}")
    else:
        click.echo(f"{database.path} is current ({total} migrations applied)")


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
@click.pass_context
def job(ctx: click.Context, command: tuple[str, ...]) -> None:
    """Run a one-off COMMAND with the broker's address in its environment. For the built-in backend
    also inside the app's context: database migrated, every setting in its environment. In another
    project (a Procfile running none of our roles) only the broker's address: its settings are its
    own. Example: dify-local job -- python script.py"""
    from runner.another_project import broker_environment, runs_our_backend
    from runner.frozen import foreign_environment
    from runner.supervisor.procfile import ProcfileError, load_procfile

    settings = settings_from(ctx, make_password=ALWAYS)
    try:
        ours = runs_our_backend(load_procfile(settings.project_dir)[0])
    except ProcfileError as error:
        fail(str(error), CONFIG_ERROR)
    env = foreign_environment(dict(os.environ))  # the binary's own loader paths are not the command's
    if ours:
        from runner.context import AppContext
        from runner.store import SchemaOutOfDate, prepare_database

        try:
            prepare_database(AppContext(settings).database, migrate=settings.MIGRATION_ENABLED)
        except SchemaOutOfDate as error:
            fail(str(error))
        env.update({setting.name: setting.kind.format(value.value) for setting, value in settings.items()})
        env.update({"DIFY_LOCAL_PROJECT_DIR": str(settings.project_dir), "MODE": "job"})
    env.update(broker_environment(settings))
    try:
        completed = subprocess.run(list(command), env=env, cwd=settings.project_dir)
    except FileNotFoundError:
        fail(f"no such command: {command[0]}", 127)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(completed.returncode)
