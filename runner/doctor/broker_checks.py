"""Checks through the broker: it answers with our password; every routed queue has a live
consumer; a worker answers and beats; one beat ticks."""

from __future__ import annotations

import time
from pathlib import Path

from runner import broker_config, topology
from runner.doctor.context import FAIL, PASS, PING_TIMEOUT, SKIP, WARN, Context, Result
from runner.doctor.host_checks import describe_process, is_local
from runner.monitor.heartbeats import age as _age, late as _late, read_heartbeats
from runner.settings import mask_url
from runner.strict_json import loads_or_none

def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 60 else f"{value / 60:.0f} min"


def _broker_down(name: str) -> Result:
    return Result(name, SKIP, "skipped: the broker does not answer (see broker)")


def start_advice(ctx: Context, role: str) -> str:
    """How to get a `role` process running, from what the running `up` (if any) says."""
    if ctx.supervisor() is None:
        return f"start the stack: `dify-local up` (or the {role} alone: `dify-local serve {role}`)"
    rows = ctx.processes(role)
    if not rows:
        return (f"this stack's `up` runs no {role}: `dify-local serve {role}` in another terminal, "
                f"or add a {role} line to the Procfile")
    names = " ".join(row["name"] for row in rows)
    if any(row["status"] == "failed" for row in rows):
        return f"`dify-local logs -n 50 {rows[0]['name']}` says why it failed; then `dify-local start {names}`"
    if all(row["status"] == "stopped" for row in rows):
        return f"`dify-local start {names}`"
    return f"`dify-local restart {names}`"


# -- 1. broker ---------------------------------------------------------------------------------------

def check_broker(ctx: Context) -> Result:
    settings = ctx.settings
    url = mask_url(settings.broker_url)
    where = "embedded" if settings.uses_embedded_broker else "external"
    try:
        client = ctx.client()  # connects, authenticates and pings
        started = time.perf_counter()
        client.ping()
    except Exception as error:
        kind, reason = broker_config.broker_error_kind(error)
        label = _LABELS.get(kind)
        return Result("broker", FAIL, f"{url} ({where}): {label + ': ' if label else ''}{reason.rstrip('. ')}",
                      fix=broker_config.broker_advice(kind, settings), data={"url": url, "kind": kind})
    latency = (time.perf_counter() - started) * 1000
    return Result("broker", PASS, f"{url} ({where}) answers PING with the configured password ({latency:.1f} ms)",
                  data={"url": url, "latency_ms": round(latency, 2)})


# the kinds whose reason is the library's own words, which do not say what they mean
_LABELS = {broker_config.UNREACHABLE: "cannot connect", broker_config.TIMEOUT: "no answer in time",
           broker_config.TLS: "TLS failed", broker_config.CERTIFICATE: "certificate refused",
           broker_config.OTHER: "refused"}


# -- 3. every routed queue consumed ------------------------------------------------------------------

def check_consumers(ctx: Context) -> Result:
    if ctx.app_line() is not None:
        return _check_app_consumers(ctx)
    if not ctx.broker_ok():
        return _broker_down("consumers")
    from runner.monitor.workers import consumers_by_queue

    snapshot = ctx.workers()
    if not snapshot.queues_of:
        return Result("consumers", SKIP, "skipped: no worker answers, so none consumes anything (see worker)")
    consumers = consumers_by_queue(snapshot.queues_of)
    missing: dict[str, list[str]] = {}
    for task, queue in topology.unconsumed_routes(consumers):
        missing.setdefault(queue, []).append(task)
    workers = ", ".join(sorted(snapshot.queues_of))
    data = {"consumers": consumers, "unconsumed": missing}
    if missing:
        queues = topology.consumption_order(missing)
        return Result(
            "consumers", FAIL,
            f"{len(queues)} queue(s) with tasks routed to them have no consumer among the live workers ({workers})",
            fix=(f"run a worker on them: `dify-local serve worker -Q {','.join(queues)}`, or add them to the "
                 "worker's -Q in the Procfile (or to CELERY_QUEUES) and restart it; until then their tasks wait"),
            lines=[f"{queue}: {', '.join(missing[queue])}" for queue in queues], data=data)
    routed = len(set(topology.ROUTES.values()))
    return Result("consumers", PASS, f"all {routed} queues with routed tasks have a consumer ({workers})", data=data)


def _check_app_consumers(ctx: Context) -> Result:
    """A project's own Celery app: every queue its tasks and beat entries go to has a worker line in
    the Procfile, and, when workers answer, a live consumer."""
    from runner.app_topology import AppTopologyError, consumers, unconsumed
    from runner.monitor.workers import consumers_by_queue

    try:
        app = ctx.app_topology()
    except AppTopologyError as error:
        return Result("consumers", FAIL, str(error),
                      fix="make the app importable with the Procfile line's own command (its virtualenv, `uv sync`), "
                          "then run `dify-local doctor` again")
    routed = app.routed()
    lines_missing = unconsumed(ctx.specs(), app)
    data = {"app": app.app, "routed": routed, "procfile_consumers": consumers(ctx.specs(), app),
            "unconsumed": lines_missing}
    if lines_missing:
        return Result(
            "consumers", FAIL,
            f"{len(lines_missing)} queue(s) of {app.app} with tasks routed to them are consumed by no worker line "
            f"of the Procfile: {', '.join(lines_missing)}",
            fix=f"add {','.join(lines_missing)} to a worker's -Q in the Procfile and restart it; until then "
                "their tasks wait", lines=[f"{queue}: {', '.join(tasks)}" for queue, tasks in lines_missing.items()],
            data=data)
    if not ctx.broker_ok():
        return Result("consumers", PASS, f"each of the {len(routed)} queues {app.app} routes tasks to has a worker "
                                         "line in the Procfile (live workers not asked: see broker)", data=data)
    snapshot = ctx.workers()
    live = consumers_by_queue(snapshot.queues_of)
    data["consumers"] = live
    if not snapshot.queues_of:
        return Result("consumers", PASS, f"each of the {len(routed)} queues {app.app} routes tasks to has a worker "
                                         "line in the Procfile (no worker answers now: see worker)", data=data)
    waiting = {queue: tasks for queue, tasks in routed.items() if queue not in live}
    if waiting:
        return Result("consumers", FAIL,
                      f"{len(waiting)} queue(s) of {app.app} have no consumer among the live workers "
                      f"({', '.join(sorted(snapshot.queues_of))}): {', '.join(waiting)}",
                      fix="start the worker lines that consume them (`dify-local ps` shows which run)",
                      lines=[f"{queue}: {', '.join(tasks)}" for queue, tasks in waiting.items()], data=data)
    return Result("consumers", PASS, f"all {len(routed)} queues of {app.app} with routed tasks have a live consumer "
                                     f"({', '.join(sorted(snapshot.queues_of))})", data=data)


# -- 4. a worker alive and beating -------------------------------------------------------------------

def check_worker(ctx: Context) -> Result:
    if not ctx.broker_ok():
        return _broker_down("worker")
    snapshot = ctx.workers()
    now = time.time()
    nodes = sorted(set(snapshot.pinged) | set(snapshot.heartbeats))
    healthy, unbeating, silent, late = [], [], [], []
    lines = []
    for node in nodes:
        beat = snapshot.heartbeats.get(node)
        answered = node in snapshot.pinged
        where = f"pid {beat.get('pid')} on {beat.get('host')}" if beat else ""
        if beat is None:
            unbeating.append(node)
            lines.append(f"{node}: answers a ping but writes no heartbeat (not a dify-local worker, or an older one)")
        elif _late(beat, now):
            late.append(node)
            lines.append(f"{node} ({where}): last heartbeat {_seconds(_age(beat, now))} ago, every "
                         f"{_seconds(float(beat.get('interval') or 0))}; "
                         + ("it answers pings, yet its timer is stuck" if answered else
                            "it answers no ping: hung, or killed without stopping"))
        elif not answered:
            silent.append(node)
            lines.append(f"{node} ({where}): heartbeat {_seconds(_age(beat, now))} ago but no answer to a ping "
                         f"within {PING_TIMEOUT:.0f} s: starting, stopping, or too busy to answer")
        else:
            healthy.append(node)
            lines.append(f"{node} ({where}): answers a ping, heartbeat {_seconds(_age(beat, now))} ago")
    data = {"pinged": snapshot.pinged, "heartbeats": snapshot.heartbeats}
    if not snapshot.pinged and not snapshot.heartbeats:
        return Result("worker", FAIL, "no worker answers a ping, and none has beaten in the last minute",
                      fix=start_advice(ctx, "worker"), data=data)
    if late or silent:
        trouble = late + silent
        return Result("worker", FAIL,
                      f"{len(trouble)} worker(s) not answering or not beating: {', '.join(trouble)}"
                      + (f" ({len(healthy)} healthy)" if healthy else ""),
                      fix=(f"{start_advice(ctx, 'worker')}; its log says what it did last "
                           "(`dify-local logs -n 50 worker`, or its terminal if started by hand)"),
                      lines=lines, data=data)
    if not healthy and ctx.app_line() is not None:  # the project's own Celery workers: a ping is all they give
        return Result("worker", PASS, f"{', '.join(unbeating)} answer(s) a ping (the project's own Celery "
                                      "worker; it writes no heartbeat of ours)", lines=lines, data=data)
    if not healthy:  # only workers without a heartbeat
        return Result("worker", WARN, f"{', '.join(unbeating)} answer(s) a ping but write no heartbeat",
                      fix="run workers with `dify-local serve worker` (or `celery -A runner.app.celery worker`), "
                          "which beat", lines=lines, data=data)
    if len(healthy) == 1 and not unbeating:
        return Result("worker", PASS, lines[0], lines=lines, data=data)
    return Result("worker", PASS, f"{len(healthy)} workers answer a ping and beat: {', '.join(healthy)}",
                  lines=lines, data=data)


# -- 5. one beat, ticking ----------------------------------------------------------------------------

def check_beat(ctx: Context) -> Result:
    if not ctx.broker_ok():
        return _broker_down("beat")
    client = ctx.client()
    instances = read_heartbeats(client, broker_config.BEAT_INSTANCE_PREFIX)
    raw = client.get(broker_config.BEAT_HEARTBEAT_KEY)
    last = loads_or_none(raw)
    last = last if isinstance(last, dict) else None
    now = time.time()
    live = {name: beat for name, beat in instances.items() if not _late(beat, now)}
    stale = {name: beat for name, beat in instances.items() if name not in live}
    data = {"instances": instances, "last_tick": last}

    def who(beat: dict) -> str:
        return f"pid {beat.get('pid')} on {beat.get('host')}"

    def what(beat: dict) -> str:
        if is_local(beat.get("host"), beat.get("pid")):
            return describe_process(beat["pid"])
        return who(beat)

    if len(live) > 1:
        ours = {row["pid"] for row in ctx.processes("beat") if row.get("pid")}
        strays = [beat for beat in live.values() if beat.get("pid") not in ours] if ours else list(live.values())[1:]
        return Result(
            "beat", FAIL,
            f"{len(live)} beats tick on this broker: {'; '.join(who(beat) for beat in live.values())}; "
            "every periodic task is sent once by each",
            fix=("stop all but one beat per broker: " + ", ".join(
                f"`kill {beat.get('pid')}` on {beat.get('host')}" for beat in strays)
                 + (" (not this stack's beat)" if ours else "")),
            lines=[f"{what(beat)}: ticked {_seconds(_age(beat, now))} ago, every "
                   f"{_seconds(float(beat.get('interval') or 0))}" for beat in live.values()],
            data=data)
    if live:
        beat = next(iter(live.values()))
        return Result("beat", PASS, f"ticked {_seconds(_age(beat, now))} ago ({who(beat)}, every "
                                    f"{_seconds(float(beat.get('interval') or 0))}); no second beat", data=data)
    celery_beat = _celery_beat(ctx)
    if celery_beat is not None:
        return Result("beat", PASS, f"Celery's own beat runs: {celery_beat} (it writes no tick of ours, so how "
                                    "often it sends is not checked)", data={**data, "celery_beat": celery_beat})
    if stale:
        beat = max(stale.values(), key=lambda b: b.get("at", 0))
        detail = (f"beat ({who(beat)}) last ticked {_seconds(_age(beat, now))} ago though it ticks every "
                  f"{_seconds(float(beat.get('interval') or 0))}: hung, or killed without stopping")
    elif last:
        detail = f"no beat is running: the last tick was {_seconds(_age(last, now))} ago ({who(last)}, which stopped)"
    else:
        detail = "no beat is running: none has ticked in the last minute"
    return Result("beat", FAIL, detail, fix=start_advice(ctx, "beat") + "; periodic tasks are not sent meanwhile",
                  data=data)


def _celery_beat(ctx: Context) -> str | None:
    """A running beat that is not ours (`celery -A app.celery beat`): a beat line of this stack's `up`
    that runs, else such a process started by hand in the project's folder."""
    import psutil

    for row in ctx.processes("beat"):
        if row.get("status") in ("running", "ready") and row.get("pid"):
            return f"{row['name']} (pid {row['pid']}) of this stack's `up`"
    from runner.supervisor.procfile import running_celery_role

    folder = ctx.settings.project_dir.resolve()
    for process in psutil.process_iter(["pid", "cmdline", "cwd"]):
        if process.info.get("cwd") and Path(process.info["cwd"]).resolve() == folder \
                and running_celery_role(process.info.get("cmdline") or []) == "beat":
            return describe_process(process.info["pid"])
    return None
