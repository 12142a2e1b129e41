"""Workflows: run a graph, read runs with their node executions, cron schedules, webhook triggers
and trigger subscriptions."""

from __future__ import annotations

import json
import time
import uuid

from flask import Blueprint, jsonify

from runner import cron, workflows
from runner.api.errors import ApiError
from runner.api.openapi import errors, json_body, json_response, query
from runner.api.validation import (
    ID,
    boolean,
    celery,
    database,
    identifier,
    integer,
    json_object,
    obj,
    optional_identifier,
    query_integer,
    sent,
    settings,
    text,
)

blueprint = Blueprint("workflows", __name__)

MAX_TTL = 30 * 86400  # seconds a subscription may be extended by


def _graph(body: dict) -> dict:
    graph = body.get("graph")
    try:
        workflows.validate(graph, workflows.TemplateLimits.from_settings(settings()))
    except workflows.WorkflowError as error:
        raise ApiError(400, f"'graph' is not a runnable workflow: {error}", field="graph") from None
    return graph


def _decoded(row: dict, *fields: str) -> dict:
    return {**row, **{field: json.loads(row[field]) if row.get(field) else None for field in fields}}


def _new_id() -> str:
    return str(uuid.uuid4())


@blueprint.post("/v1/workflows/run")
def run_workflow():
    body = json_object(("graph", "inputs", "app_id"), required=("graph",))
    graph, inputs, app_id = _graph(body), obj(body, "inputs"), optional_identifier(body, "app_id") or ""
    result = celery().send_task("run_workflow_task", args=[graph, inputs, app_id])
    return jsonify(sent(result, "run_workflow_task")), 202


@blueprint.get("/v1/workflow-runs")
def list_runs():
    limit = query_integer("limit", 50, 1, 500)
    with database().connect() as db:
        rows = list(db.query("SELECT id, app_id, status, triggered_by, source_id, error, log_path, created_at, "
                             "finished_at FROM workflow_runs ORDER BY created_at DESC LIMIT ?", [limit]))
    return jsonify({"runs": rows})


@blueprint.get("/v1/workflow-runs/<run_id>")
def get_run(run_id: str):
    identifier(run_id, "run_id")
    with database().connect() as db:
        rows = list(db.query("SELECT * FROM workflow_runs WHERE id = ?", [run_id]))
        if not rows:
            raise ApiError(404, f"no workflow run {run_id!r}")
        nodes = [_decoded(row, "inputs", "outputs") for row in db.query(
            "SELECT node_id, node_type, status, inputs, outputs, error, started_at, finished_at "
            "FROM workflow_node_executions WHERE run_id = ? ORDER BY started_at, rowid", [run_id])]
    return jsonify({**_decoded(rows[0], "graph", "inputs", "outputs"), "node_executions": nodes})


# -- schedules ------------------------------------------------------------------------------------

@blueprint.post("/v1/schedules")
def create_schedule():
    body = json_object(("graph", "cron", "inputs", "app_id", "enabled"), required=("graph", "cron"))
    graph, inputs = _graph(body), obj(body, "inputs")
    expression = text(body, "cron", 200)
    stamp = time.time()
    try:
        next_run_at = cron.next_fire(expression, stamp)
    except cron.CronError as error:
        raise ApiError(400, f"'cron' is not a five-field cron expression (minute hour day month weekday, UTC): "
                            f"{error}", field="cron") from None
    row = {"id": _new_id(), "app_id": optional_identifier(body, "app_id"), "graph": json.dumps(graph),
           "inputs": json.dumps(inputs), "cron": expression, "enabled": int(boolean(body, "enabled", True)),
           "next_run_at": next_run_at, "created_at": stamp}
    with database().transaction() as db:
        db["workflow_schedules"].insert(row)
    return jsonify(_decoded(row, "graph", "inputs")), 201


@blueprint.get("/v1/schedules")
def list_schedules():
    with database().connect() as db:
        rows = list(db.query("SELECT id, app_id, cron, enabled, next_run_at, last_run_at, created_at "
                             "FROM workflow_schedules ORDER BY created_at"))
    return jsonify({"schedules": rows})


@blueprint.get("/v1/schedules/<schedule_id>")
def get_schedule(schedule_id: str):
    identifier(schedule_id, "schedule_id")
    with database().connect() as db:
        rows = list(db.query("SELECT * FROM workflow_schedules WHERE id = ?", [schedule_id]))
        if not rows:
            raise ApiError(404, f"no schedule {schedule_id!r}")
        dispatches = list(db.query("SELECT due_at, task_id, dispatched_at, run_id FROM schedule_dispatches "
                                   "WHERE schedule_id = ? ORDER BY due_at", [schedule_id]))
    return jsonify({**_decoded(rows[0], "graph", "inputs"), "dispatches": dispatches})


@blueprint.delete("/v1/schedules/<schedule_id>")
def delete_schedule(schedule_id: str):
    identifier(schedule_id, "schedule_id")
    with database().transaction() as db:
        if not db.execute("DELETE FROM workflow_schedules WHERE id = ?", [schedule_id]).rowcount:
            raise ApiError(404, f"no schedule {schedule_id!r}")
    return jsonify({"deleted": schedule_id})


# -- webhook triggers -----------------------------------------------------------------------------

@blueprint.post("/v1/triggers")
def create_trigger():
    body = json_object(("graph", "app_id"), required=("graph",))
    row = {"id": _new_id(), "app_id": optional_identifier(body, "app_id"), "graph": json.dumps(_graph(body)),
           "created_at": time.time()}
    with database().transaction() as db:
        db["workflow_triggers"].insert(row)
    return jsonify({**_decoded(row, "graph"), "webhook": f"/v1/webhooks/{row['id']}"}), 201


@blueprint.get("/v1/triggers/<trigger_id>")
def get_trigger(trigger_id: str):
    identifier(trigger_id, "trigger_id")
    with database().connect() as db:
        rows = list(db.query("SELECT * FROM workflow_triggers WHERE id = ?", [trigger_id]))
        if not rows:
            raise ApiError(404, f"no trigger {trigger_id!r}")
        events = [_decoded(row, "payload") for row in db.query(
            "SELECT e.id, e.payload, e.run_task_id, e.received_at, r.id AS run_id, r.status AS run_status "
            "FROM trigger_events e LEFT JOIN workflow_runs r ON r.source_id = e.id "
            "WHERE e.trigger_id = ? ORDER BY e.received_at DESC LIMIT 100", [trigger_id])]
    return jsonify({**_decoded(rows[0], "graph"), "webhook": f"/v1/webhooks/{trigger_id}", "events": events})


@blueprint.delete("/v1/triggers/<trigger_id>")
def delete_trigger(trigger_id: str):
    identifier(trigger_id, "trigger_id")
    with database().transaction() as db:
        if not db.execute("DELETE FROM workflow_triggers WHERE id = ?", [trigger_id]).rowcount:
            raise ApiError(404, f"no trigger {trigger_id!r}")
    return jsonify({"deleted": trigger_id})


@blueprint.post("/v1/webhooks/<trigger_id>")
def webhook(trigger_id: str):
    identifier(trigger_id, "trigger_id")
    payload = json_object()  # any object: it becomes the workflow's inputs
    with database().connect() as db:
        if not db.execute("SELECT 1 FROM workflow_triggers WHERE id = ?", [trigger_id]).fetchone():
            raise ApiError(404, f"no trigger {trigger_id!r}; POST /v1/triggers creates one")
    result = celery().send_task("dispatch_triggered_workflow_task", args=[trigger_id, payload])
    return jsonify(sent(result, "dispatch_triggered_workflow_task", trigger_id=trigger_id)), 202


# -- trigger subscriptions ------------------------------------------------------------------------

@blueprint.post("/v1/trigger-subscriptions")
def create_subscription():
    body = json_object(("provider", "ttl_seconds"), required=("provider",))
    provider = identifier(body["provider"], "provider")
    ttl = integer(body, "ttl_seconds", 3600, 60, MAX_TTL)
    stamp = time.time()
    row = {"id": _new_id(), "provider": provider, "expires_at": stamp + ttl, "ttl_seconds": ttl,
           "refresh_count": 0}
    with database().transaction() as db:
        db["trigger_subscriptions"].insert(row)
    return jsonify(row), 201


@blueprint.get("/v1/trigger-subscriptions")
def list_subscriptions():
    with database().connect() as db:
        rows = list(db.query("SELECT id, provider, expires_at, ttl_seconds, refreshed_at, refresh_count "
                             "FROM trigger_subscriptions ORDER BY expires_at"))
    return jsonify({"subscriptions": rows})


# -- OpenAPI description of these routes ----------------------------------------------------------

def _path_id(name: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": ID.pattern}}


ID_SCHEMA = {"type": "string", "pattern": ID.pattern}
GRAPH = {"type": "object", "description": "nodes (start, template, condition, http, end) and edges",
         "required": ["nodes"],
         "properties": {"nodes": {"type": "array", "items": {"type": "object"}},
                        "edges": {"type": "array", "items": {"type": "object"}}}}
PATHS = {
    "/v1/workflows/run": {
        "post": {"summary": "Run a workflow graph on the workflow queue", "operationId": "runWorkflow",
                 "requestBody": json_body({"type": "object", "required": ["graph"], "additionalProperties": False,
                                           "properties": {"graph": GRAPH, "inputs": {"type": "object"},
                                                          "app_id": ID_SCHEMA}}),
                 "responses": {"202": json_response("accepted: poll the task for its run id"),
                               **errors(400, 413)}}},
    "/v1/workflow-runs": {
        "get": {"summary": "The latest workflow runs", "operationId": "listWorkflowRuns",
                "parameters": [query("limit", {"type": "integer", "minimum": 1, "maximum": 500})],
                "responses": {"200": json_response("the runs"), **errors(400)}}},
    "/v1/workflow-runs/{run_id}": {
        "parameters": [_path_id("run_id")],
        "get": {"summary": "A run with its node executions and run log path", "operationId": "getWorkflowRun",
                "responses": {"200": json_response("the run"), **errors(400, 404)}}},
    "/v1/schedules": {
        "get": {"summary": "The workflow schedules", "operationId": "listSchedules",
                "responses": {"200": json_response("the schedules")}},
        "post": {"summary": "Schedule a workflow with a five-field cron expression (UTC)",
                 "operationId": "createSchedule",
                 "requestBody": json_body({"type": "object", "required": ["graph", "cron"],
                                           "additionalProperties": False,
                                           "properties": {"graph": GRAPH, "cron": {"type": "string"},
                                                          "inputs": {"type": "object"}, "app_id": ID_SCHEMA,
                                                          "enabled": {"type": "boolean"}}}),
                 "responses": {"201": json_response("created"), **errors(400, 413)}}},
    "/v1/schedules/{schedule_id}": {
        "parameters": [_path_id("schedule_id")],
        "get": {"summary": "A schedule and each due time dispatched", "operationId": "getSchedule",
                "responses": {"200": json_response("the schedule"), **errors(400, 404)}},
        "delete": {"summary": "Delete a schedule", "operationId": "deleteSchedule",
                   "responses": {"200": json_response("deleted"), **errors(400, 404)}}},
    "/v1/triggers": {
        "post": {"summary": "Create a webhook trigger for a workflow", "operationId": "createTrigger",
                 "requestBody": json_body({"type": "object", "required": ["graph"], "additionalProperties": False,
                                           "properties": {"graph": GRAPH, "app_id": ID_SCHEMA}}),
                 "responses": {"201": json_response("created, with its webhook URL"), **errors(400, 413)}}},
    "/v1/triggers/{trigger_id}": {
        "parameters": [_path_id("trigger_id")],
        "get": {"summary": "A trigger with its latest events and their runs", "operationId": "getTrigger",
                "responses": {"200": json_response("the trigger"), **errors(400, 404)}},
        "delete": {"summary": "Delete a trigger and its events", "operationId": "deleteTrigger",
                   "responses": {"200": json_response("deleted"), **errors(400, 404)}}},
    "/v1/webhooks/{trigger_id}": {
        "parameters": [_path_id("trigger_id")],
        "post": {"summary": "Call a trigger's webhook: the JSON object becomes the run's inputs",
                 "operationId": "callWebhook",
                 "requestBody": json_body({"type": "object"}, required=False),
                 "responses": {"202": json_response("accepted: the dispatcher records the event and sends the run"),
                               **errors(400, 404, 413)}}},
    "/v1/trigger-subscriptions": {
        "get": {"summary": "Trigger subscriptions and their expiry", "operationId": "listTriggerSubscriptions",
                "responses": {"200": json_response("the subscriptions")}},
        "post": {"summary": "Create a trigger subscription, refreshed by the poller before it expires",
                 "operationId": "createTriggerSubscription",
                 "requestBody": json_body({"type": "object", "required": ["provider"], "additionalProperties": False,
                                           "properties": {"provider": ID_SCHEMA,
                                                          "ttl_seconds": {"type": "integer", "minimum": 60,
                                                                          "maximum": MAX_TTL}}}),
                 "responses": {"201": json_response("created"), **errors(400, 413)}}},
}
