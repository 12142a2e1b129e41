"""Failed tasks (the seed's dead letters) over HTTP: list, show, send one again."""

from __future__ import annotations


from flask import Blueprint, current_app, jsonify, request

from runner.api.errors import ApiError
from runner.api.openapi import errors, json_response, query
from runner.api.validation import query_integer, query_parameters
from runner.store.failed_tasks import get_failure, list_failures, mark_retried

blueprint = Blueprint("failed", __name__)

LIST_PARAMETERS = ("pending", "limit")
MAX_LIMIT = 1000
MAX_ID = 2**63 - 1


def _celery():
    return current_app.extensions["celery"]


def _failure(failure_id: int) -> dict:
    row = get_failure(_celery().dify.database, failure_id) if failure_id <= MAX_ID else None
    if row is None:
        raise ApiError(404, f"no failed task {failure_id}; GET /v1/failed lists them")
    return row


@blueprint.get("/v1/failed")
def list_failed():
    query_parameters(LIST_PARAMETERS)
    limit = query_integer("limit", 100, 1, MAX_LIMIT)
    pending = request.args.get("pending", "false")
    if pending not in ("true", "false"):
        raise ApiError(400, "'pending' must be true or false", field="pending")
    rows = list_failures(_celery().dify.database, include_retried=pending == "false", limit=limit)
    return jsonify({"failed": rows})


@blueprint.get("/v1/failed/<int:failure_id>")
def show_failed(failure_id: int):
    return jsonify(_failure(failure_id))


@blueprint.post("/v1/failed/<int:failure_id>/retry")
def retry_failed(failure_id: int):
    row = _failure(failure_id)
    if not isinstance(row["args"], list) or not isinstance(row["kwargs"], dict):
        raise ApiError(409, f"failed task {failure_id}'s arguments were too large to keep whole; "
                            "it cannot be sent again")
    celery = _celery()
    options = {"queue": row["queue"]} if row["queue"] else {}
    result = celery.send_task(row["name"], args=row["args"], kwargs=row["kwargs"], **options)
    mark_retried(celery.dify.database, failure_id, result.id)
    return jsonify({"id": failure_id, "task": row["name"], "queue": row["queue"], "retry_task_id": result.id,
                    "poll": f"/v1/tasks/{result.id}"}), 202


FAILED_TASK = {"type": "object", "required": ["id", "task_id", "name", "queue", "args", "kwargs", "error", "retries",
                                              "failed_at", "retried_at", "retry_task_id"],
               "properties": {"id": {"type": "integer"}, "task_id": {"type": "string"}, "name": {"type": "string"},
                              "queue": {"type": "string", "nullable": True}, "args": {}, "kwargs": {},
                              "error": {"type": "string"}, "traceback": {"type": "string", "nullable": True},
                              "retries": {"type": "integer"}, "worker": {"type": "string", "nullable": True},
                              "failed_at": {"type": "number"}, "retried_at": {"type": "number", "nullable": True},
                              "retry_task_id": {"type": "string", "nullable": True}}}
ID = [{"name": "id", "in": "path", "required": True, "description": "the failed task's number",
       "schema": {"type": "integer", "minimum": 1}}]
PATHS = {
    "/v1/failed": {"get": {
        "summary": "Tasks that failed for good (retries spent, or an error no retry can fix), latest first",
        "operationId": "listFailed",
        "parameters": [
            query("pending", {"type": "string", "enum": ["true", "false"]}, "only those not retried yet"),
            query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "how many (default 100)")],
        "responses": {"200": json_response("the failed tasks", {
            "type": "object", "required": ["failed"],
            "properties": {"failed": {"type": "array", "items": FAILED_TASK}}}), **errors(400, 503)}}},
    "/v1/failed/{id}": {"get": {
        "summary": "One failed task with its arguments, error and traceback", "operationId": "getFailed",
        "parameters": ID, "responses": {"200": json_response("the failed task", FAILED_TASK), **errors(404, 503)}}},
    "/v1/failed/{id}/retry": {"post": {
        "summary": "Send a failed task again, to the same queue with the same arguments; it is marked retried",
        "operationId": "retryFailed", "parameters": ID,
        "responses": {"202": json_response("sent: poll the URL in `poll`", {
            "type": "object", "required": ["id", "task", "queue", "retry_task_id", "poll"]}),
                      **errors(404, 409, 503)}}},
}
