"""`config` and `topology`: what the settings are, and how tasks flow to queues and workers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from runner import topology
from runner.beat_schedule import HOUSEKEEPING_TASKS, PERIODIC_TASKS
from runner.broker_config import VISIBILITY_FORMULA, visibility_timeout
from runner.cli import fail, main, settings_from
from runner.settings import GROUPS, mask_url
from runner.supervisor.preflight import consumed_queues, route_problems, route_warnings
from runner.supervisor.procfile import ProcfileError, load_procfile


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
    return "\n".join(line(cells) for cells in [headers, *rows])


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--show-secrets", is_flag=True,
              help="Print passwords as they are (the embedded broker's, e.g. to give it to another program).")
@click.pass_context
def config(ctx: click.Context, as_json: bool, show_secrets: bool) -> None:
    """Print every setting's effective value and where it came from (secrets masked)."""
    settings = settings_from(ctx)
    broker_url = settings.broker_url if show_secrets else mask_url(settings.broker_url)
    if as_json:
        click.echo(json.dumps({
            "settings": [{"name": setting.name, "group": setting.group,
                          "value": settings.display(setting.name, show_secrets), "source": value.source,
                          "help": setting.help} for setting, value in settings.items()],
            "derived": {"broker_url": broker_url, "state_dir": str(settings.state_dir), "api_url": settings.api_url,
                        "visibility_timeout": visibility_timeout(settings)},
        }, indent=2))
        return
    for group in GROUPS:
        rows = [[setting.name, value.source, settings.display(setting.name, show_secrets) or "(empty)"]
                for setting, value in settings.items() if setting.group == group]
        click.echo(click.style(group, bold=True))
        click.echo(table(rows, ["NAME", "SOURCE", "VALUE"]))
        click.echo()
    broker = "embedded" if settings.uses_embedded_broker else "external"
    click.echo(f"broker in use: {broker_url} ({broker})")
    click.echo(f"state folder:  {settings.state_dir}")
    click.echo(f"API:           {settings.api_url}")
    how = "DIFY_LOCAL_VISIBILITY_TIMEOUT" if settings.DIFY_LOCAL_VISIBILITY_TIMEOUT is not None else \
        f"derived: {VISIBILITY_FORMULA}"
    click.echo(f"visibility timeout: {visibility_timeout(settings)} s ({how})")


@main.command("topology")
@click.option("-f", "--procfile", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Procfile whose workers to show (default: the project's, or the built-in one).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.pass_context
def topology_command(ctx: click.Context, procfile: Path | None, as_json: bool) -> None:
    """Queues with their priority, the tasks routed to each, and the processes consuming each.

    In a project whose Procfile runs its own Celery app (`celery -A app.celery worker`), that app's:
    it is imported with the line's own interpreter and asked for its tasks, routes and schedule."""
    from runner.app_topology import app_line

    settings = settings_from(ctx)
    try:
        specs, source = load_procfile(settings.project_dir, procfile)
    except ProcfileError as error:
        fail(str(error), 2)
    line = app_line(specs)
    if line is not None:
        _app_topology(settings, specs, source, line, as_json)
        return
    consumers = consumed_queues(specs, settings)
    problems = route_problems(specs, settings) + route_warnings(specs, settings)
    if as_json:
        click.echo(json.dumps({
            "procfile": source,
            "queues": [{"name": q.name, "priority": q.priority.label, "work": q.work,
                        "tasks": topology.tasks_on(q.name), "consumed_by": consumers.get(q.name, [])}
                       for q in topology.QUEUES],
            "periodic": [{"task": p.task, "queue": p.queue, "when": p.describe(settings), "flag": p.flag,
                          "enabled": p.enabled(settings)} for p in PERIODIC_TASKS + HOUSEKEEPING_TASKS],
            "problems": problems,
        }, indent=2))
        sys.exit(1 if problems else 0)
    rows = []
    for spec in topology.QUEUES:
        tasks = topology.tasks_on(spec.name) or ["(none)"]
        consumed = ", ".join(consumers.get(spec.name, [])) or "NOBODY"
        rows.append([spec.name, spec.priority.label, consumed, tasks[0]])
        rows.extend(["", "", "", task] for task in tasks[1:])
    click.echo(f"Queues (workers from {source}; served high → normal → low)")
    click.echo(table(rows, ["QUEUE", "PRIORITY", "CONSUMED BY", "TASKS"]))
    click.echo()
    click.echo("Periodic tasks (beat)")
    periodic = [[p.task, p.queue, p.describe(settings),
                 f"{'on' if p.enabled(settings) else 'off'} ({p.flag or 'dify-local housekeeping, always'})"]
                for p in PERIODIC_TASKS + HOUSEKEEPING_TASKS]
    click.echo(table(periodic, ["TASK", "QUEUE", "WHEN", "STATE"]))
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    sys.exit(1 if problems else 0)


def _app_topology(settings, specs, source: str, line, as_json: bool) -> None:
    """`topology` for a project's own Celery app: its queues, the tasks routed to each and the
    worker lines consuming each, beat's schedule, and the queues no worker consumes (exit 1)."""
    from runner.app_topology import AppTopologyError, consumers, probe, probe_environment, unconsumed_lines

    try:
        app = probe(line, settings.project_dir, progress=lambda text: click.echo(f"dify-local: {text}", err=True),
                    env=probe_environment(settings))
    except AppTopologyError as error:
        fail(str(error))
    consumed = consumers(specs, app)
    routed = app.routed()
    names = list(dict.fromkeys([*routed, *app.declared_queues, *consumed]))
    problems = unconsumed_lines(specs, app) + [f"the app says: {error}" for error in app.errors]
    if as_json:
        click.echo(json.dumps({
            "procfile": source, "app": app.to_json(),
            "queues": [{"name": name, "tasks": routed.get(name, []), "consumed_by": consumed.get(name, [])}
                       for name in names],
            "periodic": app.schedule, "problems": problems,
        }, indent=2))
        sys.exit(1 if problems else 0)
    rows = []
    for name in names:
        tasks = routed.get(name) or ["(none)"]
        rows.append([name, ", ".join(consumed.get(name, [])) or "NOBODY", tasks[0]])
        rows.extend(["", "", task] for task in tasks[1:])
    click.echo(f"Queues of {app.app} (imported with `{' '.join(app.python)}` in {app.import_seconds:.1f} s; "
               f"workers from {source})")
    click.echo(table(rows, ["QUEUE", "CONSUMED BY", "TASKS"]))
    click.echo()
    click.echo("Periodic tasks (beat)")
    periodic = [[entry["name"], entry["task"], entry["queue"] or "?", entry["schedule"]] for entry in app.schedule]
    click.echo(table(periodic, ["NAME", "TASK", "QUEUE", "WHEN"]) if periodic else "(none)")
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    sys.exit(1 if problems else 0)
