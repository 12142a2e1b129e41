"""`init --dify`: a Procfile for a Dify checkout's api/ folder, as Dify's dev scripts start it
(dev/start-api, dev/start-worker, dev/start-beat), the worker on the queues the app itself routes to."""

from __future__ import annotations

from pathlib import Path

import click

from runner.cli import CONFIG_ERROR, fail
from runner.supervisor.procfile import PROCFILE, describe

# Dify's documented worker queues (api/README.md, dev/start-worker, 1.12): the fallback when the
# app cannot be imported. Dify has shipped queues outside this list (trigger_refresh_publisher).
DIFY_DOCUMENTED_QUEUES = (
    "dataset", "priority_dataset", "priority_pipeline", "pipeline", "mail", "ops_trace", "app_deletion", "plugin",
    "workflow_storage", "conversation", "workflow", "schedule_poller", "schedule_executor",
    "triggered_workflow_dispatcher", "trigger_refresh_executor", "retention")
DIFY_PORT = 5001  # Dify's API port (dev/start-api, api/README.md)


def launcher(folder: Path) -> str:
    """How the checkout runs its programs: uv (Dify's since 1.3), poetry (before), its .venv, or PATH."""
    if (folder / "uv.lock").exists():
        return "uv run "
    if (folder / "poetry.lock").exists():
        return "poetry run "
    if (folder / ".venv" / "bin" / "celery").exists():
        return ".venv/bin/"
    return ""


def dify_procfile(run: str, queues: list[str]) -> str:
    # loopback, not Dify's 0.0.0.0: a laptop's API is not for the network
    return (f"api: {run}flask run --host 127.0.0.1 --port {DIFY_PORT} --debug\n"
            f"worker: {run}celery -A app.celery worker -P threads -c 2 --loglevel INFO -Q {','.join(queues)}\n"
            f"beat: {run}celery -A app.celery beat --loglevel INFO\n")


def app_queues(folder: Path, run: str) -> tuple[list[str], str | None]:
    """The queues the app's tasks and beat entries go to, and why not when it cannot be imported."""
    from runner.app_topology import AppTopologyError, frozen_free_environment, probe

    line = describe("worker", f"{run}celery -A app.celery worker")
    try:
        app = probe(line, folder, progress=lambda text: click.echo(f"dify-local: {text}", err=True),
                    env=frozen_free_environment())
    except AppTopologyError as error:
        return list(DIFY_DOCUMENTED_QUEUES), str(error)
    from runner.topology import consumption_order

    return list(consumption_order(app.queues())), None  # high-priority queues first, as ours


def init_dify(folder: Path, force: bool) -> None:
    if not (folder / "app.py").is_file():
        fail(f"{folder} has no app.py: run `dify-local init --dify` in a Dify checkout's api/ folder", CONFIG_ERROR)
    procfile = folder / PROCFILE
    if procfile.exists() and not force:
        fail(f"{folder} has a {PROCFILE} already; nothing was written (--force rewrites it)")
    run = launcher(folder)
    queues, failed = app_queues(folder, run)
    if failed:
        click.echo(f"dify-local: warning: the worker's -Q is Dify's documented list, not the app's: {failed}; "
                   "`dify-local topology` checks it once the app imports", err=True)
    try:
        procfile.write_text(dify_procfile(run, queues), encoding="utf-8")
    except OSError as error:
        fail(f"cannot write {procfile}: {error.strerror or error}; name a folder this user can write", CONFIG_ERROR)
    source = "Dify's documented list" if failed else "app.celery's routes"
    click.echo(f"wrote {procfile}: api (port {DIFY_PORT}), worker on {len(queues)} queues ({source}), beat")
    if not (folder / ".env").exists() and (folder / ".env.example").exists():
        click.echo("first: cp .env.example .env   (Dify's app reads its settings from it)")
    click.echo("next: dify-local up    (Dify's app also needs its SQL database, a vector store and the plugin "
               "daemon: see the README's \"Your own Dify checkout\")")
