"""Per-task metrics over HTTP: attempts, outcomes and runtimes by task over the last hours."""

from __future__ import annotations

import re

from flask import Blueprint, current_app, jsonify

from runner.api.openapi import errors, json_response, query
from runner.api.validation import query_integer, query_matching, query_parameters
from runner.store.task_metrics import metrics_since

blueprint = Blueprint("metrics", __name__)

PARAMETERS = ("hours", "task")
MAX_HOURS = 24 * 366
TASK_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")


@blueprint.get("/v1/metrics")
def task_metrics():
    query_parameters(PARAMETERS)
    hours = query_integer("hours", 24, 1, MAX_HOURS)
    task = query_matching("task", TASK_NAME, "a task name (GET /v1/tasks lists them)")
    database = current_app.extensions["celery"].dify.database
    return jsonify({"hours": hours, "tasks": metrics_since(database, hours, task)})


METRIC = {"type": "object", "required": ["task", "finished", "succeeded", "failed", "retried", "runtime_mean",
                                         "runtime_max"],
          "properties": {"task": {"type": "string"}, "finished": {"type": "integer"},
                         "succeeded": {"type": "integer"}, "failed": {"type": "integer"},
                         "retried": {"type": "integer"}, "runtime_mean": {"type": "number", "nullable": True},
                         "runtime_max": {"type": "number"}}}
PATHS = {
    "/v1/metrics": {"get": {
        "summary": "Per task over the last hours: attempts finished, succeeded, failed, retried, runtimes",
        "operationId": "taskMetrics",
        "parameters": [
            query("hours", {"type": "integer", "minimum": 1, "maximum": MAX_HOURS}, "the window (default 24)"),
            query("task", {"type": "string", "pattern": TASK_NAME.pattern}, "one task only")],
        "responses": {"200": json_response("the metrics, busiest task first", {
            "type": "object", "required": ["hours", "tasks"],
            "properties": {"hours": {"type": "integer"}, "tasks": {"type": "array", "items": METRIC}}}),
                      **errors(400, 503)}}},
}
