"""Failed tasks (the seed's dead letters) over HTTP: list, show, send one again."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from runner.api.errors import ApiError
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
    unknown = sorted(set(request.args) - set(LIST_PARAMETERS))
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r}; allowed: {', '.join(LIST_PARAMETERS)}")
    raw_limit = request.args.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise ApiError(400, f"'limit' must be a whole number from 1 to {MAX_LIMIT}")
    pending = request.args.get("pending", "false")
    if pending not in ("true", "false"):
        raise ApiError(400, "'pending' must be true or false")
    rows = list_failures(_celery().dify.database, include_retried=pending == "false", limit=int(raw_limit))
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
