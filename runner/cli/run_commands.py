"""`up`: the whole stack from a Procfile, supervised."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from runner.cli import CONFIG_ERROR, fail, main, settings_from


@main.command()
@click.argument("names", nargs=-1)
@click.option("--broker", "broker_url", metavar="URL", help="Use this Redis (CELERY_BROKER_URL); no embedded broker.")
@click.option("--port", type=int, help="API port (DIFY_PORT).")
@click.option("--broker-port", type=int, help="Embedded broker port (REDIS_PORT).")
@click.option("--broker-password", help="Embedded broker password (REDIS_PASSWORD).")
@click.option("--state-dir", help="State folder (DIFY_LOCAL_STATE_DIR).")
@click.option("-f", "--procfile", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Procfile to run (default: the project's, or the built-in Dify stack).")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Seconds a process may take to become ready before it is reported.")
@click.option("--grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds a process gets to stop before it is forced (workers finish running tasks).")
@click.pass_context
def up(ctx: click.Context, names: tuple[str, ...], broker_url, port, broker_port, broker_password, state_dir,
       procfile: Path | None, ready_timeout: float, grace: float) -> None:
    """Start the stack: broker, api, worker and beat (or NAMES of the Procfile), until Ctrl-C."""
    from runner.state import StatePaths
    from runner.supervisor.manager import Supervisor
    from runner.supervisor.preflight import port_problems, route_problems
    from runner.supervisor.procfile import ProcfileError, load_procfile

    settings = settings_from(
        ctx, broker=("--broker", "CELERY_BROKER_URL", broker_url), port=("--port", "DIFY_PORT", port),
        broker_port=("--broker-port", "REDIS_PORT", broker_port),
        broker_password=("--broker-password", "REDIS_PASSWORD", broker_password),
        state_dir=("--state-dir", "DIFY_LOCAL_STATE_DIR", state_dir))
    try:
        specs, source = load_procfile(settings.project_dir, procfile)
    except ProcfileError as error:
        fail(str(error), CONFIG_ERROR)
    problems = route_problems(specs, settings)
    if names:
        known = [spec.name for spec in specs]
        unknown = [name for name in names if name not in known]
        if unknown:
            fail(f"no process {unknown[0]!r} in {source}; it has: {', '.join(known)}", CONFIG_ERROR)
        specs = [spec for spec in specs if spec.name in names]
    if problems:
        for problem in problems:
            click.echo(f"dify-local: {problem}", err=True)
        sys.exit(CONFIG_ERROR)
    problems = port_problems(specs, settings)
    if problems:
        for problem in problems:
            click.echo(f"dify-local: {problem}", err=True)
        sys.exit(1)
    StatePaths(settings.state_dir).ensure()
    supervisor = Supervisor(settings, specs, ready_timeout=ready_timeout, grace=grace)
    supervisor.say(f"dify-local up: {len(supervisor.states)} processes from {source}, state in {settings.state_dir}")
    sys.exit(supervisor.run())
