"""Process control from another terminal: ps, restart, stop, start, logs, down.

They talk to a running `up` over the control socket in the state folder and wait for the outcome
(restarted and ready again, stopped, gone), saying what happened.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from runner.cli import fail, main, settings_from
from runner.cli.inspect_commands import table

WAIT_LIMIT = 180.0  # seconds any command waits for the outcome it asked for


def _state_dir(ctx: click.Context) -> Path:
    return settings_from(ctx).state_dir


def _ask(state_dir: Path, message: dict[str, Any]) -> dict[str, Any]:
    from runner.supervisor import control

    try:
        reply = control.request(state_dir, message)
    except control.NotRunning as error:
        fail(f"{error}; start the stack with `dify-local up`")
    if not reply.get("ok"):
        fail(reply.get("error", "the supervisor refused"))
    return reply


def _processes(state_dir: Path) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in _ask(state_dir, {"command": "ps"})["processes"]}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _memory(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def ps(ctx: click.Context, as_json: bool) -> None:
    """The processes of the running stack: pid, state, uptime, restarts, readiness, memory."""
    reply = _ask(_state_dir(ctx), {"command": "ps"})
    if as_json:
        click.echo(json.dumps(reply, indent=2))
        return
    rows = [[p["name"], p["pid"] or "-", "degraded" if p.get("degraded") else p["status"],
             "yes" if p["ready"] else "no", _duration(p["uptime"]), p["restarts"], _memory(p["memory"]),
             "-" if p["last_exit"] is None else p["last_exit"]]
            for p in reply["processes"]]
    click.echo(table(rows, ["NAME", "PID", "STATE", "READY", "UPTIME", "RESTARTS", "MEMORY", "LAST EXIT"]))
    for p in reply["processes"]:
        if p.get("degraded"):
            click.echo(f"{p['name']} is {p['degraded']}: free space on the state folder's disk; the worker and beat "
                       "wait, the API answers 503")
    supervisor = reply["supervisor"]
    click.echo(f"supervisor pid {supervisor['pid']}, up {_duration(supervisor['uptime'])}, "
               f"state in {supervisor['state_dir']}")
    reload = reply.get("reload")
    if reload:
        spares = ", ".join(f"{spare['name']} (pid {spare['pid']}, {_memory(spare['memory'])}"
                           f"{'' if spare['ready'] else ', loading'})" for spare in reload["spares"])
        click.echo(f"reloading on changes in {', '.join(reload['watching'])}"
                   + (f"; spares for fast reloads: {spares}" if spares else ""))
    else:
        click.echo("reload off")


def _wait(state_dir: Path, names: list[str], before: dict[str, dict], done) -> None:
    """Poll until `done(row, before_row)` holds for every name, reporting each as it does."""
    pending = list(names)
    deadline = time.monotonic() + WAIT_LIMIT
    while pending:
        rows = _processes(state_dir)
        for name in list(pending):
            message = done(rows[name], before.get(name, {}))
            if message:
                click.echo(f"{name}: {message}")
                pending.remove(name)
        if not pending:
            return
        if time.monotonic() > deadline:
            fail(f"still waiting after {WAIT_LIMIT:.0f} s for: {', '.join(pending)} "
                 f"(see `dify-local logs {pending[0]}`)")
        time.sleep(0.2)


def _came_up(row: dict, before: dict) -> str | None:
    if row["status"] == "ready" and (row["pid"] != before.get("pid") or before.get("status") != "ready"):
        return f"ready (pid {row['pid']})"
    if row["status"] == "finished":
        return "finished (status 0)"
    if row["status"] == "failed":
        return f"failed (last exit {row['last_exit']}); see `dify-local logs {row['name']}`"
    return None


@main.command()
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def restart(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Restart processes (a name, a process type for all its replicas, or a glob such as 'worker*'),
    waiting until each is ready again. Workers stop warmly: running tasks finish first."""
    state_dir = _state_dir(ctx)
    before = _processes(state_dir)
    reply = _ask(state_dir, {"command": "restart", "names": list(names)})
    click.echo(f"restarting {', '.join(reply['processes'])}")
    _wait(state_dir, reply["processes"], before, _came_up)


@main.command()
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def stop(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Stop processes and keep them stopped (the rest of the stack keeps running)."""
    state_dir = _state_dir(ctx)
    reply = _ask(state_dir, {"command": "stop", "names": list(names)})
    _wait(state_dir, reply["processes"], {},
          lambda row, _: f"stopped (last exit {row['last_exit']})" if row["status"] == "stopped" else None)


@main.command()
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def start(ctx: click.Context, names: tuple[str, ...]) -> None:
    """Start stopped or failed processes again, waiting until each is ready."""
    state_dir = _state_dir(ctx)
    before = _processes(state_dir)
    reply = _ask(state_dir, {"command": "start", "names": list(names)})
    _wait(state_dir, reply["processes"], before, _came_up)


@main.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop the whole stack (as Ctrl-C in its terminal does) and wait until nothing of it is left."""
    import psutil

    from runner.supervisor import control

    state_dir = _state_dir(ctx)
    try:
        reply = control.request(state_dir, {"command": "down"})
    except control.NotRunning:
        click.echo(f"nothing was running for {state_dir}")
        return
    started = time.monotonic()
    click.echo(f"stopping the stack (supervisor pid {reply['pid']}) …")

    def gone() -> bool:  # a zombie has exited: only its parent (a shell, a test) has yet to reap it
        try:
            return psutil.Process(reply["pid"]).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    while not gone():
        if time.monotonic() - started > WAIT_LIMIT:
            fail(f"the stack is still stopping after {WAIT_LIMIT:.0f} s (supervisor pid {reply['pid']})")
        time.sleep(0.1)
    click.echo(f"stopped in {time.monotonic() - started:.1f} s")


@main.command()
@click.argument("names", nargs=-1)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines as they come.")
@click.option("-n", "--lines", "count", type=click.IntRange(min=0), default=None,
              help="How many of the latest lines to print first [default: 50, or 10 with -f].")
@click.pass_context
def logs(ctx: click.Context, names: tuple[str, ...], follow: bool, count: int | None) -> None:
    """Print the processes' log lines (all, or NAMES: names, process types, globs), from the files in
    the state folder; with -f, follow the running stack."""
    from honcho.colour import get_colours
    from honcho.printer import Message, Printer

    from runner.state import StatePaths
    from runner.supervisor import control
    from runner.supervisor.logfiles import logged_names, recent_lines

    state_dir = _state_dir(ctx)
    paths = StatePaths(state_dir)
    folder = paths.logs
    known = logged_names(paths)
    chosen = sorted({name for pattern in names for name in known
                     if name == pattern or name.rsplit(".", 1)[0] == pattern or fnmatch.fnmatchcase(name, pattern)})
    if names and not chosen:
        fail(f"no logs for {', '.join(names)} in {folder}; there are: {', '.join(known) or 'none yet'}")
    count = count if count is not None else (10 if follow else 50)
    colours = {}
    palette = get_colours()
    printer = Printer(sys.stdout)
    printer.width = max([len(name) for name in known] + [6])

    def show(when: datetime.datetime, name: str, text: str) -> None:
        if name not in colours:
            colours[name] = next(palette)
        printer.write(Message("line", text, when, name, colours[name]))

    if not follow:
        if not known:
            fail(f"no logs yet in {folder}: they appear once `dify-local up` has run here")
        for line in recent_lines(paths, chosen or known, count):
            show(line.time, line.name, line.text)
        return
    try:
        for line in control.stream(state_dir, {"command": "logs", "follow": True, "names": list(names),
                                               "lines": count}):
            show(datetime.datetime.fromisoformat(line["time"]), line["name"], line["text"])
    except control.NotRunning as error:
        for line in recent_lines(paths, chosen or known, count) if known else []:
            show(line.time, line.name, line.text)
        fail(f"{error}: there is nothing to follow")
    except KeyboardInterrupt:
        pass
