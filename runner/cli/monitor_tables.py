"""The text of `inspect` and `queues`: the workers' replies and the queue report as tables, one row
per task, worker or queue. Knows nothing of brokers or Celery apps: data in, text out."""

from __future__ import annotations

import datetime
from typing import Any, Callable

from runner import topology
from runner.cli.inspect_commands import table
from runner.monitor.format import NONE, call_arguments, clock, duration, shorten, signed, sparkline
from runner.monitor.workers import pool_name

ARGS_WIDTH = 48  # characters of a task's arguments shown; --json has them whole


def _names(replies: dict[str, Any]) -> str:
    return ", ".join(sorted(replies))


def _queue(request: dict[str, Any]) -> str:
    return (request.get("delivery_info") or {}).get("routing_key") or NONE


def _arguments(request: dict[str, Any]) -> str:
    return shorten(call_arguments(request.get("args"), request.get("kwargs")), ARGS_WIDTH) or NONE


def _or_nothing(rows: list[list[str]], headers: list[str], nothing: str, replies: dict[str, Any]) -> str:
    if not rows:
        count = len(replies)
        return f"no {nothing} ({count} worker{'' if count == 1 else 's'} answered: {_names(replies)})"
    return table(rows, headers)


def active(replies: dict[str, Any], now: float) -> str:
    rows = []
    for worker, requests in sorted(replies.items()):
        for request in sorted(requests or [], key=lambda r: r.get("time_start") or now):
            started = request.get("time_start")
            rows.append([worker, request.get("name") or NONE, request.get("id") or NONE, _queue(request),
                         clock(started), duration(now - started) if started else NONE, _arguments(request)])
    return _or_nothing(rows, ["WORKER", "TASK", "ID", "QUEUE", "STARTED", "RUNNING", "ARGS"],
                       "task is running", replies)


def _eta(text: str | None) -> float | None:
    try:
        return datetime.datetime.fromisoformat(text).timestamp() if text else None
    except ValueError:
        return None


def scheduled(replies: dict[str, Any], now: float) -> str:
    rows = []
    for worker, entries in sorted(replies.items()):
        for entry in sorted(entries or [], key=lambda e: e.get("eta") or ""):
            request, eta = entry.get("request") or {}, _eta(entry.get("eta"))
            due = NONE if eta is None else ("now" if eta <= now else f"in {duration(eta - now)}")
            rows.append([worker, request.get("name") or NONE, request.get("id") or NONE, _queue(request),
                         clock(eta), due, _arguments(request)])
    return _or_nothing(rows, ["WORKER", "TASK", "ID", "QUEUE", "ETA", "DUE", "ARGS"],
                       "task is waiting for its countdown or eta", replies)


def reserved(replies: dict[str, Any], now: float) -> str:
    rows = [[worker, request.get("name") or NONE, request.get("id") or NONE, _queue(request), _arguments(request)]
            for worker, requests in sorted(replies.items()) for request in requests or []]
    return _or_nothing(rows, ["WORKER", "TASK", "ID", "QUEUE", "ARGS"],
                       "task is reserved (taken from its queue, waiting for a free slot)", replies)


def registered(replies: dict[str, Any], now: float) -> str:
    rows = []
    for worker, tasks in sorted(replies.items()):
        # each entry is "name [rate_limit=… …]" when the task has such options
        for index, name in enumerate(sorted(entry.split(" [", 1)[0] for entry in tasks or [])):
            rows.append([worker if index == 0 else "", name, topology.ROUTES.get(name, "(its sender's choice)")])
    return _or_nothing(rows, ["WORKER", "TASK", "QUEUE"], "task is registered", replies)


def _pool(stats: dict[str, Any]) -> tuple[str, str]:
    pool = stats.get("pool") or {}
    kind = pool_name(str(pool["implementation"])) if pool.get("implementation") else NONE  # -P's name: threads
    return kind, str(pool.get("max-concurrency", NONE))


def _broker(stats: dict[str, Any]) -> str:
    broker = stats.get("broker") or {}
    if not broker.get("hostname"):
        return NONE
    database = f"/{broker['virtual_host']}" if broker.get("virtual_host") not in (None, "", "/") else ""
    return f"{broker.get('transport', '?')}://{broker['hostname']}:{broker.get('port', '?')}{database}"


def stats(replies: dict[str, Any], now: float) -> str:
    rows = []
    for worker, facts in sorted(replies.items()):
        kind, concurrency = _pool(facts or {})
        accepted = sum((facts.get("total") or {}).values())  # taken since start, finished or not
        rows.append([worker, str(facts.get("pid", NONE)), duration(facts.get("uptime")), kind, concurrency,
                     str(facts.get("prefetch_count", NONE)), str(accepted), _broker(facts)])
    return table(rows, ["WORKER", "PID", "UPTIME", "POOL", "CONCURRENCY", "PREFETCH", "ACCEPTED", "BROKER"])


def ping(replies: dict[str, Any], now: float) -> str:
    rows = [[worker, (reply or {}).get("ok") or str(reply)] for worker, reply in sorted(replies.items())]
    return table(rows, ["WORKER", "REPLY"])


def active_queues(replies: dict[str, Any], now: float) -> str:
    rows = []
    for worker, queues in sorted(replies.items()):
        names = topology.consumption_order(queue.get("name", "?") for queue in queues or [])
        for index, name in enumerate(names):
            spec = topology.BY_NAME.get(name)
            rows.append([worker if index == 0 else "", name, spec.priority.label if spec else NONE])
    return _or_nothing(rows, ["WORKER", "QUEUE", "PRIORITY"], "queue is consumed", replies)


INSPECT_TABLES: dict[str, Callable[[dict[str, Any], float], str]] = {
    "active": active, "scheduled": scheduled, "reserved": reserved, "registered": registered,
    "stats": stats, "ping": ping, "active_queues": active_queues,
}


# -- queues -----------------------------------------------------------------------------------------

def _trend(trend: dict[str, Any] | None) -> str:
    if not trend:
        return NONE
    return f"{sparkline(trend['depths'])} {signed(trend['change'])}"


def _consumers(workers: list[str]) -> str:
    if not workers:
        return "NOBODY"
    shown = ", ".join(workers[:2])  # the same few workers on every row: --json has them all
    return shown + (f" +{len(workers) - 2} more" if len(workers) > 2 else "")


def queue_table(report: dict[str, Any]) -> str:
    rows = [[q["name"], q["priority"] or NONE, str(q["depth"]), _consumers(q["consumers"]),
             duration(q["oldest_age"]), _trend(q["trend"])] for q in report["queues"]]
    text = table(rows, ["QUEUE", "PRIORITY", "DEPTH", "CONSUMERS", "OLDEST", "TREND (5 min)"])
    waiting = sum(q["depth"] for q in report["queues"])
    workers, timeout = report["workers"], report["timeout"]
    broker = f"{report['broker']} ({'embedded' if report['embedded'] else 'external'})"
    if workers:
        answered = f"consumers: {len(workers)} worker{'' if len(workers) == 1 else 's'} answered within {timeout:g} s"
    else:
        answered = (f"consumers: no worker answered within {timeout:g} s (is the stack up with a worker? "
                    "`dify-local ps`)")
    return f"{text}\n\n{waiting} waiting in all · broker {broker}\n{answered}"
