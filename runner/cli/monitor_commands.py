"""`inspect`, `queues` and `purge`: what the running stack is doing, through whichever broker the
settings name (the embedded one or a real Redis), read with runner.monitor.

Each command first connects once without retries (as `broker info` does), so a broker that is
down or refuses the password is one line, not a minute of kombu's retries and a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import textwrap
import time
from typing import Any, Callable, Iterator

import click

from runner.cli import Seconds, fail, main, settings_from
from runner.cli.monitor_tables import INSPECT_TABLES, queue_table
from runner.monitor.workers import DEFAULT_TIMEOUT, INSPECT_METHODS
from runner.settings import Settings, mask_url
from runner.settings.loader import IF_POSSIBLE

USAGE = 2  # bad input, as click's own usage errors
TREND_WINDOW = 300.0  # seconds of queue samples behind the trend column
TREND_POINTS = 10  # characters of the trend's sparkline


def _window(out) -> os.terminal_size:
    """The size of the terminal being drawn on, as it is now: not COLUMNS/LINES from the environment
    (shutil's first choice), which a parent may have exported for another size (pytest-xdist: 80×24)."""
    try:
        return os.get_terminal_size(out.fileno())
    except (OSError, ValueError, AttributeError):
        return shutil.get_terminal_size()


def _broker_label(settings: Settings) -> str:
    return f"{mask_url(settings.broker_url)} ({'embedded' if settings.uses_embedded_broker else 'external'})"


def _broker_failure(settings: Settings, error: BaseException) -> str:
    from runner.broker_config import explain_broker_error

    return explain_broker_error(error, settings, settings.broker_url)[1]


class BrokerUnavailable(Exception):
    """The broker cannot be used; the message is one line saying why and what to do."""


@contextlib.contextmanager
def _channel(settings: Settings) -> Iterator[Any]:
    """A kombu channel to the broker, connected with one try; a failure to connect, or the
    connection failing midway (the broker stopped), is BrokerUnavailable."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    from runner.cli.broker_commands import connected

    stack = contextlib.ExitStack()
    try:
        channel = stack.enter_context(connected(settings))
    except Exception as error:  # every way of failing to reach it ends as one line
        raise BrokerUnavailable(_broker_failure(settings, error)) from None
    with stack:
        try:
            yield channel
        except (OSError, RedisError, OperationalError) as error:
            raise BrokerUnavailable(_broker_failure(settings, error)) from None


def _celery(settings: Settings):
    from runner.celery_app import create_celery_app

    return create_celery_app(settings, register_tasks=False)


# -- inspect ----------------------------------------------------------------------------------------

@main.command("inspect")
@click.argument("method", type=click.Choice(INSPECT_METHODS), metavar="METHOD")
@click.option("--json", "as_json", is_flag=True, help="Print the workers' raw replies as JSON.")
@click.option("--timeout", type=Seconds(600), default=DEFAULT_TIMEOUT, show_default=True,
              help="Seconds to wait for the workers' replies.")
@click.option("-d", "--destination", "destinations", multiple=True, metavar="WORKER",
              help="Ask only this worker (its node name, e.g. worker@host; repeatable).")
@click.pass_context
def inspect_command(ctx: click.Context, method: str, as_json: bool, timeout: float,
                    destinations: tuple[str, ...]) -> None:
    """Ask the running workers, over the broker, what they are doing (Celery's `inspect`).

    \b
    active         tasks running now, with how long they have run
    scheduled      tasks held for their countdown or eta
    reserved       tasks taken from the queue, waiting for a free slot
    registered     the tasks each worker can run, with their queue
    stats          pid, uptime, pool, concurrency, tasks accepted since start
    ping           which workers answer
    active_queues  the queues each worker consumes

    No answer within --timeout is an error (exit status 1).
    """
    from runner.monitor.workers import inspect

    settings = settings_from(ctx, make_password=IF_POSSIBLE)
    try:
        with _channel(settings):  # checked first: Celery's broadcast would retry for seconds
            replies = inspect(_celery(settings), method, timeout, list(destinations) or None)
    except BrokerUnavailable as error:
        fail(str(error))
    if as_json:
        click.echo(json.dumps(replies, indent=2, sort_keys=True, default=str))
    if not replies:
        asked = f"no worker{' named ' + ', '.join(destinations) if destinations else ''}"
        fail(f"{asked} answered `inspect {method}` within {timeout:g} s through the broker "
             f"{_broker_label(settings)}; is the stack up with a worker? `dify-local ps` shows its processes, "
             f"`dify-local up` starts them (a busy or distant worker may need a longer --timeout)")
    if not as_json:
        click.echo(INSPECT_TABLES[method](replies, time.time()))
    silent = [name for name in destinations if name not in replies]
    if silent:
        fail(f"no answer from {', '.join(silent)} within {timeout:g} s "
             f"(answered: {', '.join(sorted(replies))})")


# -- queues -----------------------------------------------------------------------------------------

@main.command("queues")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--watch", is_flag=True, help="Refresh every --interval seconds until Ctrl-C.")
@click.option("--interval", type=Seconds(3600), default=2.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--timeout", type=Seconds(600), default=DEFAULT_TIMEOUT, show_default=True,
              help="Seconds to wait for the workers to say which queues they consume.")
@click.pass_context
def queues_command(ctx: click.Context, as_json: bool, watch: bool, interval: float, timeout: float) -> None:
    """Each queue: priority class, messages waiting (priority sub-lists summed), the workers consuming
    it (NOBODY: none), its oldest waiting message's age and the trend of its depth (when beat has
    sampled it)."""
    settings = settings_from(ctx, make_password=IF_POSSIBLE)
    app, history = _celery(settings), _sample_reader(settings)
    app_queues = _app_queues(settings)

    def frame() -> str:
        report = queue_report(settings, app, timeout, history, app_queues)
        return json.dumps(report, indent=2) if as_json else queue_table(report)

    if not watch:
        try:
            click.echo(frame())
        except BrokerUnavailable as error:
            fail(str(error))
        return
    _watch(frame, settings, interval)


def _app_queues(settings: Settings) -> dict[str, list[str]]:
    """queue → tasks of the project's own Celery app (`celery -A app.celery worker` in its Procfile),
    asked of the app once; nothing (and one line on stderr) when it cannot be imported."""
    from runner.app_topology import AppTopologyError, app_line, probe, probe_environment
    from runner.supervisor.procfile import ProcfileError, load_procfile

    try:
        line = app_line(load_procfile(settings.project_dir)[0])
    except ProcfileError:
        return {}
    if line is None:
        return {}
    try:
        return probe(line, settings.project_dir, progress=lambda text: click.echo(f"dify-local: {text}", err=True),
                     env=probe_environment(settings)).routed()
    except AppTopologyError as error:
        click.echo(f"dify-local: the app's own queues are not listed: {error}", err=True)
        return {}


def queue_report(settings: Settings, app, timeout: float,
                 history: Callable[[list[str], float], dict[str, list[tuple[float, int]]]],
                 app_queues: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The queues' state as JSON-ready data: the 16 of the topology in its order, then any other
    queue that has messages or a consumer, or that the project's own app sends tasks to."""
    from runner import topology
    from runner.monitor.queues import observed_queue_states
    from runner.monitor.workers import active_queues, consumers_by_queue

    with _channel(settings) as channel:
        queues_of_workers = active_queues(app, timeout)
        consumers = consumers_by_queue(queues_of_workers)
        states = observed_queue_states(channel, set(consumers) | set(app_queues or ()))
    now = time.time()
    samples = history(list(states), now)
    rows = []
    for name, state in states.items():
        spec = topology.BY_NAME.get(name)
        rows.append({
            "name": name,
            "priority": spec.priority.label if spec else None,
            "depth": state.depth,
            "consumers": consumers.get(name, []),
            "app_tasks": (app_queues or {}).get(name, []),
            "oldest_sent_at": state.oldest_sent_at,
            "oldest_age": state.oldest_age(now),
            "trend": _trend(samples.get(name), state.depth, now),
        })
    return {"broker": mask_url(settings.broker_url), "embedded": settings.uses_embedded_broker, "at": now,
            "timeout": timeout, "workers": sorted(queues_of_workers), "queues": rows}


def _sample_reader(settings: Settings) -> Callable[[list[str], float], dict[str, list[tuple[float, int]]]]:
    """Recent depth samples of the queues named (written by beat): none when the stack never ran
    here, or its database predates them. The database is opened once, when it first exists."""
    import sqlite3

    from runner.state import StatePaths
    from runner.store.database import Database, DatabaseBusy, PoolLimits
    from runner.store.queue_samples import sample_history

    path = StatePaths(settings.state_dir).database
    opened: list[Database] = []

    def history(names: list[str], now: float) -> dict[str, list[tuple[float, int]]]:
        if not opened:
            if not path.exists():
                return {}
            opened.append(Database(path, PoolLimits(size=1, overflow=0, timeout=2)))  # a trend may wait 2 s, no more
        try:
            return sample_history(opened[0], now - TREND_WINDOW, names)
        except (sqlite3.Error, DatabaseBusy):  # no queue_samples table yet, or the file locked
            return {}
    return history


def _trend(points: list[tuple[float, int]] | None, depth: int, now: float) -> dict[str, Any] | None:
    from runner.monitor.format import resample

    if not points:
        return None
    series = [*points, (now, depth)]  # the line ends at the depth just read
    return {"window_seconds": TREND_WINDOW, "samples": len(points), "since": points[0][0],
            "change": depth - points[0][1],
            "depths": resample(series, now - TREND_WINDOW, now, TREND_POINTS)}


def _watch(frame: Callable[[], str], settings: Settings, interval: float) -> None:
    """Show `frame()` every `interval` seconds until Ctrl-C (exit status 0). On a terminal each frame
    is redrawn from the top, cut to the window so it never scrolls; otherwise one block per frame."""
    tty = sys.stdout.isatty()
    out = click.get_text_stream("stdout")
    if tty:
        out.write("\x1b[?25l\x1b[2J")  # hide the cursor, clear once
    try:
        while True:
            started = time.monotonic()
            try:
                text = frame()
            except BrokerUnavailable as error:  # not up yet, or restarting: say so, keep watching
                text = f"dify-local: {error}"
                if tty:  # wrapped, not cut at the window's edge: the advice is at the end
                    text = textwrap.fill(text, _window(out).columns)
            header = f"every {interval:g} s · {time.strftime('%H:%M:%S')} · {_broker_label(settings)} · Ctrl-C stops"
            lines = [header, "", *text.splitlines()]
            if tty:
                size = _window(out)
                shown = [line[:size.columns] + "\x1b[K" for line in lines[:max(1, size.lines - 1)]]
                out.write("\x1b[H" + "\n".join(shown) + "\n\x1b[J")
            else:
                out.write("\n".join(lines) + "\n\n")
            out.flush()
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `queues --watch | head`: the reader is gone; nothing more to flush to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        if tty:
            with contextlib.suppress(OSError):  # the terminal may be gone
                out.write("\x1b[?25h")
                out.flush()
    sys.exit(0)


# -- purge ------------------------------------------------------------------------------------------

@main.command("purge")
@click.argument("queues", nargs=-1, metavar="QUEUE...")
@click.option("--all", "every", is_flag=True, help="Every queue: the 16 and any other with messages.")
@click.option("-y", "--yes", is_flag=True, help="Delete without asking.")
@click.pass_context
def purge_command(ctx: click.Context, queues: tuple[str, ...], every: bool, yes: bool) -> None:
    """Delete the messages waiting in QUEUE (all its priority sub-lists), after showing how many and
    asking. Messages a worker has taken already (running or reserved) are not touched."""
    from runner import topology
    from runner.monitor.queues import channel_queue_depths, purge_queue

    if bool(queues) == every:
        fail("name the queues to purge, or --all (not both); the queues are: "
             + ", ".join(topology.QUEUE_NAMES), USAGE)
    settings = settings_from(ctx, make_password=IF_POSSIBLE)
    try:
        with _channel(settings) as channel:
            names = _purge_names(channel, settings, list(dict.fromkeys(queues)), every)
            waiting = {name: depth for name, depth in channel_queue_depths(channel, names).items() if depth}
    except BrokerUnavailable as error:
        fail(str(error))
    if not waiting:
        what = (f"the queue {names[0]} is" if len(names) == 1 else f"all {len(names)} queues are" if every
                else f"the queues {', '.join(names)} are")
        click.echo(f"{what} empty: nothing to purge")
        return
    for name, depth in waiting.items():
        click.echo(f"{name}: {_messages(depth)} waiting")
    if not yes:
        total = sum(waiting.values())
        question = (f"Delete {'it' if total == 1 else 'them'}?" if len(waiting) == 1
                    else f"Delete these {_messages(total)} from {len(waiting)} queues?")
        try:
            agreed = click.confirm(question, default=False)
        except click.Abort:  # stdin closed with no answer, or Ctrl-C at the prompt
            click.echo()
            fail("no answer: nothing removed (--yes purges without asking)")
        if not agreed:
            click.echo("nothing removed")
            return
    try:
        # a connection of its own: the question may have waited long enough for the broker to restart.
        # Only the queues shown: one that filled up meanwhile was not agreed to.
        with _channel(settings) as channel:
            removed = {name: purge_queue(channel, name) for name in waiting}
    except BrokerUnavailable as error:
        fail(f"nothing removed: {error}")
    for name, count in removed.items():
        click.echo(f"removed {_messages(count)} from {name}")


def _purge_names(channel, settings: Settings, queues: list[str], every: bool) -> list[str]:
    """The queues to purge: those named, or every queue; a name not on the broker is an error."""
    from runner import topology
    from runner.monitor.queues import bound_queues

    known = list(topology.QUEUE_NAMES)
    known += sorted(bound_queues(channel) - set(known))
    unknown = [name for name in queues if name not in known]
    if unknown:
        fail(f"no queue {unknown[0]!r} on {mask_url(settings.broker_url)}; the queues are: {', '.join(known)}",
             USAGE)
    return known if every else queues


def _messages(count: int) -> str:
    return f"{count} message{'' if count == 1 else 's'}"
