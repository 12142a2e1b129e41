"""Health (the stack's, and this API's own for readiness probes) and the queues: depth, oldest
message, consumers and the depth over time."""

from __future__ import annotations

import math
import os
import time

from flask import Blueprint, current_app, jsonify, request

from runner import topology
from runner.api.openapi import errors, json_response, query
from runner.api.stack import CONTROL_TIMEOUT
from runner.api.validation import query_integer, query_parameters
from runner.monitor.channel import read_channel
from runner.monitor.queues import observed_queue_states
from runner.monitor.stack_health import heartbeat_checks, supervised_check
from runner.monitor.workers import consumers_by_queue
from runner.settings import mask_url
from runner.store.migrations import schema_state
from runner.store.queue_samples import sample_history
from runner.write_refusal import refusal_in
from runner.supervisor import control

blueprint = Blueprint("status", __name__)


def _check_broker(celery, writes: bool = True) -> dict:
    """PING; and with `writes`, whether it takes writes (a broker refusing them, MISCONF, still
    answers: /health fails, but this API can still answer, so its readiness probe passes)."""
    started = time.perf_counter()
    url = mask_url(celery.conf.broker_url)
    try:
        with read_channel(celery) as channel:
            channel.client.ping()
            latency = round((time.perf_counter() - started) * 1000, 2)
            persistence = channel.client.info("persistence") if writes else {}
    except Exception as error:
        return {"ok": False, "url": url, "error": f"{type(error).__name__}: {error}"}
    refusal = refusal_in(persistence)
    if refusal is not None:
        return {"ok": False, "url": url, "latency_ms": latency, "refusing_writes": True,
                "error": f"{refusal}; nothing can be sent or acknowledged until it can write again: free "
                         "space on the state folder's disk"}
    return {"ok": True, "url": url, "latency_ms": latency}


def _check_database(celery) -> dict:
    database = celery.dify.database
    try:
        state = schema_state(database)
    except Exception as error:
        return {"ok": False, "path": str(database.path), "error": f"{type(error).__name__}: {error}"}
    if not state.current:
        return {"ok": False, "path": str(database.path), "error": f"pending migrations: {', '.join(state.pending)}"}
    return {"ok": True, "path": str(database.path), "migrations": len(state.applied)}


def _check_processes(celery, broker: dict) -> dict[str, dict]:
    """Under `up` (one runs for this state folder), its view of every process; otherwise the
    workers' and beat's heartbeats on the broker (runner.monitor.stack_health)."""
    try:
        reply = control.request(current_app.extensions["dify_settings"].state_dir, {"command": "ps"},
                                timeout=CONTROL_TIMEOUT)
    except control.NotRunning:
        reply = None
    except (OSError, ValueError) as error:  # a timeout, a reply that is not JSON
        return {"processes": {"ok": False, "error": f"`dify-local up` did not answer `ps` in {CONTROL_TIMEOUT:.0f} s: "
                                                    f"{error}"}}
    if reply is not None and reply.get("ok"):
        return {"processes": supervised_check(reply, os.getpid())}
    if not broker["ok"]:
        unknown = {"ok": False, "error": "unknown: the broker does not answer (see broker)"}
        return {"workers": unknown, "beat": unknown}
    try:
        with read_channel(celery) as channel:
            return heartbeat_checks(channel.client)
    except Exception as error:
        failed = {"ok": False, "error": f"cannot read the heartbeats: {type(error).__name__}: {error}"}
        return {"workers": failed, "beat": failed}


def _answer(checks: dict[str, dict]):
    ok = all(check["ok"] for check in checks.values())
    return jsonify({"status": "ok" if ok else "unavailable", "checks": checks}), 200 if ok else 503


@blueprint.get("/health")
def health():
    celery = current_app.extensions["celery"]
    checks = {"broker": _check_broker(celery), "database": _check_database(celery)}
    checks.update(_check_processes(celery, checks["broker"]))
    return _answer(checks)


@blueprint.get("/health/api")
def api_health():
    celery = current_app.extensions["celery"]
    return _answer({"broker": _check_broker(celery, writes=False), "database": _check_database(celery)})


QUEUE_PARAMETERS = ("history",)
MAX_HISTORY = 24 * 60  # minutes: what retention keeps by default
MAX_POINTS = 120  # per queue: enough for a small chart, small enough to fetch every few seconds


def downsampled(samples: list[tuple[float, int]], since: float, step: float) -> list[list[float]]:
    """One point per `step` seconds from `since`: the bucket's largest depth (a spike stays
    visible) at the time of its last sample."""
    buckets: dict[int, list[float]] = {}
    for at, depth in samples:
        bucket = buckets.setdefault(math.floor((at - since) / step), [at, depth])
        bucket[0], bucket[1] = at, max(bucket[1], depth)
    return [buckets[key] for key in sorted(buckets)]


@blueprint.get("/v1/queues")
def queues():
    query_parameters(QUEUE_PARAMETERS)
    minutes = query_integer("history", 0, 1, MAX_HISTORY) if "history" in request.args else None
    celery = current_app.extensions["celery"]
    interval = current_app.extensions["dify_settings"].DIFY_LOCAL_QUEUE_SAMPLE_INTERVAL
    consumed = current_app.extensions["worker_inspections"].ask("active_queues")["active_queues"]
    consumers = consumers_by_queue({worker: sorted(queue["name"] for queue in queues or [])
                                    for worker, queues in consumed.items()})
    now = time.time()
    with read_channel(celery) as channel:
        states = observed_queue_states(channel, consumers)
    body: dict = {"at": now, "sample_interval": interval, "workers_answered": len(consumed)}
    history = {}
    if minutes is not None:
        since = now - minutes * 60
        history = sample_history(celery.dify.database, since, states)
        # points spread over the samples there are: a stack younger than the window gets a fine chart
        first = min((samples[0][0] for samples in history.values()), default=since)
        start = max(since, first)
        step = max((now - start) / MAX_POINTS, interval or 1)
        history = {name: downsampled(samples, start, step) for name, samples in history.items()}
        body["history"] = {"minutes": minutes, "since": since, "first_sample_at": None if first == since else first,
                           "step": step}
    listed = []
    for name, state in states.items():
        spec = topology.BY_NAME.get(name)
        entry = {"name": name, "priority": spec.priority.label if spec else None, "depth": state.depth,
                 "oldest_age": None if state.oldest_sent_at is None else round(state.oldest_age(now), 3),
                 "consumers": consumers.get(name, [])}
        if minutes is not None:
            entry["history"] = history.get(name, [])
        listed.append(entry)
    return jsonify({"queues": listed, **body})


QUEUE = {"type": "object", "required": ["name", "priority", "depth", "oldest_age", "consumers"],
         "properties": {"name": {"type": "string"}, "priority": {"type": "string", "nullable": True,
                                     "description": "high, normal or low; null for a queue outside the topology"},
                        "depth": {"type": "integer"},
                        "oldest_age": {"type": "number", "nullable": True,
                                       "description": "seconds the oldest waiting message has waited"},
                        "consumers": {"type": "array", "items": {"type": "string"}},
                        "history": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}}
CHECK = {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}
HEALTH = {"type": "object", "required": ["status", "checks"],
          "properties": {"status": {"type": "string", "description": "ok or unavailable"},
                         "checks": {"type": "object", "additionalProperties": CHECK}}}
PATHS = {
    "/health": {"get": {
        "summary": "Whether the stack can do its work: the broker and the metadata database answer, and every "
                   "process is ready (under `up`, its view: `processes`; otherwise the workers' and beat's "
                   "heartbeats on the broker: `workers`, `beat`)", "operationId": "health",
        "responses": {"200": json_response("all is well", HEALTH),
                      "503": json_response("something is not (each check says what and why)", HEALTH)}}},
    "/health/api": {"get": {
        "summary": "Whether this API can answer: the broker and the metadata database answer (`up`'s readiness "
                   "probe for the API)", "operationId": "api_health",
        "responses": {"200": json_response("both answer", HEALTH),
                      "503": json_response("one of them does not (the body says which and why)", HEALTH)}}},
    "/v1/queues": {"get": {
        "summary": "The 16 queues (then any other holding messages or consumed): priority class, depth "
                   "(priority sub-lists included), the oldest waiting "
                   "message's age, the workers consuming each (those answering within a second), and with "
                   "`history` the depth over the last minutes (beat samples it every "
                   "DIFY_LOCAL_QUEUE_SAMPLE_INTERVAL seconds)",
        "operationId": "queues",
        "parameters": [query("history", {"type": "integer", "minimum": 1, "maximum": MAX_HISTORY},
                             f"minutes of depth history per queue, at most {MAX_POINTS} points "
                             "[time, largest depth] each")],
        "responses": {"200": json_response("the queues", {
            "type": "object", "required": ["queues", "at", "sample_interval", "workers_answered"],
            "properties": {"queues": {"type": "array", "items": QUEUE}, "at": {"type": "number"},
                           "sample_interval": {"type": "integer"}, "workers_answered": {"type": "integer"},
                           "history": {"type": "object", "properties": {
                               "minutes": {"type": "integer"}, "since": {"type": "number"},
                               "first_sample_at": {"type": "number", "nullable": True},
                               "step": {"type": "number", "description": "seconds each point stands for"}}}}}),
                      **errors(400, 503)}}},
}
