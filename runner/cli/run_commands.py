"""`up`: the processes of a Procfile (ours, or any project's), supervised."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from runner.cli import CONFIG_ERROR, CliState, Seconds, fail, main, settings_from

MOST_SECONDS = 24 * 3600.0  # --ready-timeout and --grace: a day is more than any start or stop needs


def watch_plan(settings, specs, watch: tuple[str, ...], ignore: tuple[str, ...]):
    """What `up` watches: --watch folders (checked), or the defaults; never the state folder or logs."""
    from runner.reload.watcher import WatchPlan, default_roots

    roots = []
    for text in watch:
        path = Path(text).expanduser()
        path = (path if path.is_absolute() else Path.cwd() / path).resolve()
        if not path.is_dir():
            fail(f"--watch {text}: no such folder; name a folder of code to watch", CONFIG_ERROR)
        roots.append(path)
    if not roots:
        roots = default_roots(settings.project_dir, any(spec.is_ours for spec in specs))
    state_dir = settings.state_dir.resolve()
    for root in roots:
        if root.is_relative_to(state_dir):
            fail(f"--watch {root}: that is inside the state folder {state_dir}, which is never watched",
                 CONFIG_ERROR)
    excluded = [state_dir]
    if settings.LOG_FILE:
        log_file = Path(settings.LOG_FILE).expanduser()
        excluded.append((log_file if log_file.is_absolute() else settings.project_dir / log_file).resolve())
    return WatchPlan(tuple(roots), tuple(ignore), tuple(excluded))


def _echo_all(problems: list[str], status: int) -> None:
    for problem in problems:
        click.echo(f"dify-local: {problem}", err=True)
    sys.exit(status)


@main.command()
@click.argument("names", nargs=-1)
@click.option("--broker", "broker_url", metavar="URL", help="Use this Redis (CELERY_BROKER_URL); no embedded broker.")
@click.option("--port", type=int, help="API port (DIFY_PORT).")
@click.option("--broker-port", type=int, help="Embedded broker port (REDIS_PORT).")
@click.option("--broker-password", help="Embedded broker password (REDIS_PASSWORD).")
@click.option("--state-dir", help="State folder (DIFY_LOCAL_STATE_DIR).")
@click.option("--no-persist", is_flag=True, help="The embedded broker keeps its data in memory only.")
@click.option("-f", "--procfile", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Procfile to run (default: the project's, or the built-in Dify stack).")
@click.option("--scale", "scale", multiple=True, metavar="NAME=N",
              help="Run N replicas of a process type (worker.1, worker.2, …); repeatable.")
@click.option("-c", "--concurrency", "concurrency", multiple=True, metavar="NAME=N[,NAME=N]",
              help="The same, as honcho's -c takes it.")
@click.option("--ready-timeout", type=Seconds(MOST_SECONDS, 1, included=True), default=60.0, show_default=True,
              help="Seconds a process may take to become ready before it is reported.")
@click.option("--grace", type=Seconds(MOST_SECONDS, 0, included=True), default=10.0, show_default=True,
              help="Seconds a process gets to stop before it is forced (workers finish running tasks).")
@click.option("--reload/--no-reload", default=True, show_default=True,
              help="Reload the processes whose code changed (never the broker).")
@click.option("--watch", "watch", multiple=True, metavar="PATH",
              help="Folder to watch instead of the defaults (the Procfile's folder and dify-local's own code); "
                   "repeatable.")
@click.option("--ignore", "ignore", multiple=True, metavar="GLOB",
              help="Changes to leave alone, e.g. 'data/*' or '*.csv'; repeatable.")
@click.pass_context
def up(ctx: click.Context, names: tuple[str, ...], broker_url, port, broker_port, broker_password, state_dir,
       no_persist: bool, procfile: Path | None, scale: tuple[str, ...], concurrency: tuple[str, ...],
       ready_timeout: float, grace: float, reload: bool, watch: tuple[str, ...], ignore: tuple[str, ...]) -> None:
    """Start the processes of the Procfile (broker, api, worker and beat by default; NAMES for some)
    and keep them running until Ctrl-C or `dify-local down`. Edited code is reloaded: see --no-reload."""
    from runner.settings.loader import ALWAYS, read_env_files
    from runner.state import StatePaths
    from runner.errors import StateError
    from runner.state_access import (
        GONE_HOLDER_WAIT,
        StateFolderBusy,
        broker_lock,
        make_private,
        up_lock,
    )
    from runner.supervisor.api_place import free_port, port_holder, with_our_api
    from runner.supervisor.manager import Supervisor
    from runner.supervisor.options import OPTIONS_FILE, ProcessOptionsError, load_process_options
    from runner.supervisor.preflight import broker_problems, port_problems, route_problems, route_warnings
    from runner.supervisor.procfile import MAX_REPLICAS, PROCFILE, ProcfileError, expand, load_procfile, parse_scale
    from runner.supervisor.watchdog import stop_leftovers

    flags = dict(broker=("--broker", "CELERY_BROKER_URL", broker_url), port=("--port", "DIFY_PORT", port),
                 broker_port=("--broker-port", "REDIS_PORT", broker_port),
                 broker_password=("--broker-password", "REDIS_PASSWORD", broker_password),
                 state_dir=("--state-dir", "DIFY_LOCAL_STATE_DIR", state_dir),
                 persist=("--no-persist", "DIFY_LOCAL_BROKER_PERSIST", "false" if no_persist else None))
    settings = settings_from(ctx, follow_stack=False, **flags)
    try:
        specs, source = load_procfile(settings.project_dir, procfile)
        types = [spec.process_type for spec in specs]
        replicas = parse_scale(scale + concurrency, types, at_most=MAX_REPLICAS)
    except ProcfileError as error:
        fail(str(error), CONFIG_ERROR)
    problems = route_problems(specs, settings)
    warnings = route_warnings(specs, settings)
    all_specs = specs
    if names:
        unknown = [name for name in names if name not in types]
        if unknown:
            fail(f"no process {unknown[0]!r} in {source}; it has: {', '.join(types)}", CONFIG_ERROR)
        specs = [spec for spec in specs if spec.process_type in names]
    if problems:
        _echo_all(problems, CONFIG_ERROR)
    try:
        options = load_process_options(settings.project_dir, types)
    except ProcessOptionsError as error:
        _echo_all(error.lines, CONFIG_ERROR)
    try:
        tightened = make_private(settings.state_dir)
        lock = up_lock(settings.state_dir)  # held until this process ends (its watchdog's, after a kill)
        lock.acquire(GONE_HOLDER_WAIT, waiting=lambda line: click.echo(f"dify-local: {line}", err=True))
        stop_leftovers(settings.state_dir, lambda line: click.echo(f"dify-local: {line}", err=True))
        if settings.uses_embedded_broker:
            broker_lock(settings.state_dir).check()  # a `serve broker` of its own on this folder
    except StateError as error:  # StateFolderRefused among them
        fail(str(error), error.exit_status)
    except StateFolderBusy as error:
        fail(str(error))
    problems = port_problems(specs, settings) + broker_problems(settings)
    if problems:
        _echo_all(problems, 1)
    # the state folder's broker password, made only now: a refused `up` leaves the folder as it was
    settings = settings_from(ctx, follow_stack=False, make_password=ALWAYS, **flags)
    StatePaths(settings.state_dir).ensure()
    dotenv = read_env_files(settings.project_dir, ctx.find_object(CliState).env_files)
    base_port = dotenv.get("PORT") or os.environ.get("PORT")  # honcho's base for each process's $PORT
    if base_port is not None and not (base_port.isdigit() and 0 < int(base_port) < 65536):
        fail(f"PORT={base_port!r} is not allowed: a port number, the base honcho counts $PORT from", CONFIG_ERROR)
    env_files = ctx.find_object(CliState).env_files
    plan = watch_plan(settings, specs, watch, ignore) if reload else None
    read_by_up = {(settings.project_dir / name).resolve() for name in env_files} | {
        (settings.project_dir / OPTIONS_FILE).resolve(), (procfile or settings.project_dir / PROCFILE).resolve()}
    instances, added = with_our_api(expand(specs, replicas, int(base_port) if base_port else None), bool(names))
    holder = port_holder(instances, settings, dotenv, added)
    moved = None
    if holder is not None:  # our API and dashboard beside theirs, on a free port
        moved = (settings.DIFY_PORT, holder)
        flags["port"] = ("a free port", "DIFY_PORT",
                         free_port(settings.DIFY_BIND_ADDRESS, settings.DIFY_PORT, instances, dotenv))
        settings = settings_from(ctx, follow_stack=False, make_password=ALWAYS, **flags)
    supervisor = Supervisor(settings, instances, options, dotenv, ready_timeout=ready_timeout, grace=grace,
                            watch=plan, read_by_up=read_by_up, lock=lock, api_moved=moved)
    supervisor.say(f"dify-local up: {len(supervisor.states)} processes from {source}, state in {settings.state_dir}")
    if tightened:
        supervisor.say(tightened)
    if plan is not None:
        supervisor.say(f"reloading on changes in {plan.describe()} (--no-reload turns it off)")
    for warning in warnings:
        supervisor.say(f"warning: {warning}")
    _check_app_routes_later(supervisor, all_specs, settings, {**dotenv, **os.environ})
    sys.exit(supervisor.run())


def _check_app_routes_later(supervisor, specs, settings, env: dict[str, str]) -> None:
    """A project's own Celery app (`celery -A app.celery worker`): its routes against the Procfile's
    workers, said once the app has been imported. In a thread, once the stack is ready: a Dify app
    imports for 20 s, and a fourth import beside the api's, worker's and beat's would slow their
    start on a laptop's cores. A queue no worker consumes is a warning, never a refusal."""
    import threading

    from runner.app_topology import AppTopologyError, app_line, probe, probe_environment, unconsumed_lines

    line = app_line(specs)
    if line is None:
        return

    def check() -> None:
        while not supervisor.ready_announced:
            if supervisor.stopping.wait(0.2):
                return
        try:
            app = probe(line, settings.project_dir, env=probe_environment(settings, env), cancel=supervisor.stopping)
        except AppTopologyError as error:
            if supervisor.stopping.is_set():
                return
            supervisor.say_later(f"warning: the app's queues were not checked: {error}")
            return
        found = unconsumed_lines(specs, app)
        for warning in found:
            supervisor.say_later(f"warning: {warning}")
        if not found:
            supervisor.say_later(f"{app.app}: every queue its {len(app.tasks)} tasks and {len(app.schedule)} "
                                 "periodic entries go to has a worker in the Procfile")

    threading.Thread(target=check, name="app-routes", daemon=True).start()
