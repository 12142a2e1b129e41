"""The running stack as the dashboard shows it: the supervisor's processes, the workers and what
they run, beat's schedule. Each read is bounded in time, so a refresh never hangs on a part that
is down: the control socket answers within CONTROL_TIMEOUT, the workers within the inspect timeout."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from flask import Blueprint, current_app, jsonify

from runner.api.openapi import errors, json_response
from runner.beat_schedule import PERIODIC_TASKS
from runner.monitor.beat import beat_state
from runner.monitor.format import shorten
from runner.monitor.workers import pool_name
from runner.process_env import SUPERVISED
from runner.store.task_runs import task_runs_by_id
from runner.supervisor import control

blueprint = Blueprint("stack", __name__)

CONTROL_TIMEOUT = 2.0  # seconds to wait for `up` to answer `ps`
TEXT_LIMIT = 300  # characters of a task's arguments shown in a list


def short_json(value: Any, limit: int = TEXT_LIMIT) -> str:
    """Arguments as compact JSON text, cut at `limit` characters (they are user data of any size)."""
    return shorten(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=repr), limit)


def _settings():
    return current_app.extensions["dify_settings"]


def _celery():
    return current_app.extensions["celery"]


@blueprint.get("/v1/processes")
def processes():
    supervised = os.environ.get(SUPERVISED) == "1"
    state_dir = _settings().state_dir
    body: dict[str, Any] = {"supervised": supervised, "running": False, "message": None, "supervisor": None,
                            "processes": []}
    try:
        reply = control.request(state_dir, {"command": "ps"}, timeout=CONTROL_TIMEOUT)
    except control.NotRunning as error:
        body["message"] = (f"This API is not running under `dify-local up`: {error}, so there are no processes "
                           "to show. `dify-local up` runs the whole stack and supervises it.")
        return jsonify(body)
    except (OSError, ValueError) as error:  # a timeout, a reply that is not JSON
        body["message"] = f"`dify-local up` did not answer over its control socket in {CONTROL_TIMEOUT:.0f} s: {error}"
        return jsonify(body)
    if not reply.get("ok"):
        body["message"] = f"`dify-local up` refused: {reply.get('error', 'no reason given')}"
        return jsonify(body)
    body["running"] = True
    if not supervised:
        body["message"] = ("This API was started outside `dify-local up`; these are the processes `up` runs "
                           f"for the same state folder ({state_dir}).")
    body["supervisor"] = reply.get("supervisor")
    body["processes"] = [{**{key: row.get(key) for key in PROCESS_FIELDS}, "this": row.get("pid") == os.getpid()}
                         for row in reply.get("processes", [])]
    return jsonify(body)


PROCESS_FIELDS = ("name", "role", "pid", "status", "ready", "uptime", "restarts", "memory", "last_exit")


def _task(entry: dict[str, Any], runs: dict[str, dict[str, Any]], now: float) -> dict[str, Any]:
    """A task as a worker reports it in `active` or `reserved`, with when it started from task_runs
    (a worker's own clock for it is a monotonic one, meaningless in another process)."""
    delivery = entry.get("delivery_info") or {}
    run = runs.get(entry.get("id")) or {}
    started = run.get("started_at")
    return {"id": entry.get("id"), "name": entry.get("name"), "args": short_json(entry.get("args", [])),
            "kwargs": short_json(entry.get("kwargs", {})), "queue": delivery.get("routing_key"),
            "started_at": started, "running_for": None if started is None else max(0.0, now - started)}


@blueprint.get("/v1/workers")
def workers():
    inspections = current_app.extensions["worker_inspections"]
    answers = inspections.ask("active", "reserved", "active_queues", "stats")
    names = sorted(set().union(*answers.values()))
    ids = [task.get("id") for method in ("active", "reserved") for tasks in answers[method].values()
           for task in tasks or []]
    runs = task_runs_by_id(_celery().dify.database, [task_id for task_id in ids if isinstance(task_id, str)])
    now = time.time()
    listed = []
    for name in names:
        stats = answers["stats"].get(name) or {}
        pool = stats.get("pool") or {}
        listed.append({
            "name": name,
            "queues": sorted(queue["name"] for queue in answers["active_queues"].get(name) or []),
            "pid": stats.get("pid"), "pool": pool_name(pool["implementation"]) if pool.get("implementation") else None,
            "concurrency": pool.get("max-concurrency"), "uptime": stats.get("uptime"),
            "processed": sum((stats.get("total") or {}).values()),
            "active": [_task(task, runs, now) for task in answers["active"].get(name) or []],
            "reserved": [_task(task, runs, now) for task in answers["reserved"].get(name) or []],
        })
    return jsonify({"timeout": inspections.timeout, "workers": listed})


@blueprint.get("/v1/beat")
def beat():
    heartbeat, published = beat_state(_celery())
    now = time.time()
    settings = _settings()
    body: dict[str, Any] = {
        "running": heartbeat is not None,
        "heartbeat": None if heartbeat is None else {**heartbeat, "age": max(0.0, now - heartbeat.get("at", now))},
        "published_at": None if published is None else published.get("at"),
        "entries": [] if published is None else published.get("entries", []),
        # what beat does not run, and the setting that would make it (from this API's settings: under
        # `up` the same as beat's)
        "disabled": [{"task": p.task, "queue": p.queue, "schedule": p.describe(settings), "flag": p.flag}
                     for p in PERIODIC_TASKS if not p.enabled(settings)],
    }
    return jsonify(body)


TASK = {"type": "object", "properties": {
    "id": {"type": "string"}, "name": {"type": "string"}, "args": {"type": "string"}, "kwargs": {"type": "string"},
    "queue": {"type": "string", "nullable": True}, "started_at": {"type": "number", "nullable": True},
    "running_for": {"type": "number", "nullable": True}}}
PROCESS = {"type": "object", "required": ["name", "status", "this"], "properties": {
    "name": {"type": "string"}, "role": {"type": "string", "nullable": True},
    "pid": {"type": "integer", "nullable": True}, "status": {"type": "string"}, "ready": {"type": "boolean"},
    "uptime": {"type": "number", "nullable": True}, "restarts": {"type": "integer"},
    "memory": {"type": "integer", "nullable": True, "description": "RSS in bytes, with its children"},
    "last_exit": {"nullable": True}, "this": {"type": "boolean", "description": "the process serving this API"}}}
ENTRY = {"type": "object", "required": ["name", "task", "schedule", "next_run_at"], "properties": {
    "name": {"type": "string"}, "task": {"type": "string"}, "queue": {"type": "string", "nullable": True},
    "schedule": {"type": "string"}, "last_run_at": {"type": "number", "nullable": True},
    "next_run_at": {"type": "number", "nullable": True}, "runs": {"type": "integer"}}}
PATHS = {
    "/v1/processes": {"get": {
        "summary": "The processes `dify-local up` supervises (state, uptime, restarts, memory), asked over its "
                   "control socket; `running` false and a `message` when no `up` runs for this state folder",
        "operationId": "processes",
        "responses": {"200": json_response("the processes", {
            "type": "object", "required": ["supervised", "running", "message", "processes"],
            "properties": {"supervised": {"type": "boolean", "description": "this API was started by `up`"},
                           "running": {"type": "boolean"}, "message": {"type": "string", "nullable": True},
                           "supervisor": {"type": "object", "nullable": True},
                           "processes": {"type": "array", "items": PROCESS}}})}}},
    "/v1/workers": {"get": {
        "summary": "The workers answering Celery's inspect within the timeout (1 s): queues, pool, and the tasks "
                   "each is running (active) and holds (reserved)",
        "operationId": "workers",
        "responses": {"200": json_response("the workers that answered", {
            "type": "object", "required": ["timeout", "workers"],
            "properties": {"timeout": {"type": "number"}, "workers": {"type": "array", "items": {
                "type": "object", "required": ["name", "queues", "active", "reserved"],
                "properties": {"name": {"type": "string"}, "queues": {"type": "array", "items": {"type": "string"}},
                               "pid": {"type": "integer", "nullable": True},
                               "pool": {"type": "string", "nullable": True},
                               "concurrency": {"type": "integer", "nullable": True},
                               "uptime": {"type": "number", "nullable": True}, "processed": {"type": "integer"},
                               "active": {"type": "array", "items": TASK},
                               "reserved": {"type": "array", "items": TASK}}}}}}),
                      **errors(503)}}},
    "/v1/beat": {"get": {
        "summary": "Beat's schedule as beat last published it on the broker: each entry's task, queue, schedule, "
                   "last and next run; and the periodic tasks turned off, with the flag that turns each on",
        "operationId": "beat",
        "responses": {"200": json_response("beat's state", {
            "type": "object", "required": ["running", "heartbeat", "entries", "disabled"],
            "properties": {"running": {"type": "boolean", "description": "beat has ticked within the last minute"},
                           "heartbeat": {"type": "object", "nullable": True},
                           "published_at": {"type": "number", "nullable": True},
                           "entries": {"type": "array", "items": ENTRY},
                           "disabled": {"type": "array", "items": {"type": "object"}}}}),
                      **errors(503)}}},
}
