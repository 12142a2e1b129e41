"""Recent task runs over HTTP: each task's state, queue, worker, timings and error, newest first."""

from __future__ import annotations

from celery import states
from flask import Blueprint, current_app, jsonify, request

from runner.api.errors import ApiError
from runner.api.openapi import errors, json_response, query
from runner.api.stack import short_json
from runner.api.validation import query_integer, query_parameters
from runner.store.task_runs import recent_task_runs

blueprint = Blueprint("task_runs", __name__)

PARAMETERS = ("limit", "state")
MAX_LIMIT = 500
STATES = tuple(sorted(states.ALL_STATES))
ERROR_LIMIT = 500  # characters of an error in a list; GET /v1/tasks/<id> has it whole


@blueprint.get("/v1/task-runs")
def task_runs():
    query_parameters(PARAMETERS)
    limit = query_integer("limit", 50, 1, MAX_LIMIT)
    state = request.args.get("state")
    if state is not None and state not in STATES:
        raise ApiError(400, f"'state' must be one of {', '.join(STATES)}", field="state")
    rows = recent_task_runs(current_app.extensions["celery"].dify.database, limit, state)
    return jsonify({"runs": [{
        "id": row["id"], "name": row["name"], "queue": row["queue"], "state": row["state"],
        "worker": row["worker"], "attempts": row["attempts"], "args": short_json(row["args"] or "[]"),
        "kwargs": short_json(row["kwargs"] or "{}"), "queued_at": row["queued_at"], "started_at": row["started_at"],
        "finished_at": row["finished_at"], "runtime": row["runtime"],
        "error": None if row["error"] is None else short_json(row["error"], ERROR_LIMIT),
    } for row in rows]})


RUN = {"type": "object", "required": ["id", "name", "state"], "properties": {
    "id": {"type": "string"}, "name": {"type": "string"}, "queue": {"type": "string", "nullable": True},
    "state": {"type": "string"}, "worker": {"type": "string", "nullable": True}, "attempts": {"type": "integer"},
    "args": {"type": "string", "description": "JSON, cut at 300 characters"}, "kwargs": {"type": "string"},
    "queued_at": {"type": "number", "nullable": True}, "started_at": {"type": "number", "nullable": True},
    "finished_at": {"type": "number", "nullable": True}, "runtime": {"type": "number", "nullable": True},
    "error": {"type": "string", "nullable": True}}}
PATHS = {
    "/v1/task-runs": {"get": {
        "summary": "The task runs recorded last (sent or started), newest first: state, queue, worker, attempts, "
                   "times, runtime and error",
        "operationId": "taskRuns",
        "parameters": [
            query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "how many (default 50)"),
            query("state", {"type": "string", "enum": list(STATES)}, "only runs in this state")],
        "responses": {"200": json_response("the runs", {
            "type": "object", "required": ["runs"], "properties": {"runs": {"type": "array", "items": RUN}}}),
                      **errors(400, 503)}}},
}
