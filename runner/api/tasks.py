"""Sending tasks and polling their results: the seed's enqueue-then-poll pattern."""

from __future__ import annotations

import math
import re

import redis
from celery.result import AsyncResult
from flask import Blueprint, current_app, jsonify, url_for
from kombu.utils.uuid import uuid
from kombu.exceptions import DecodeError, OperationalError

from runner import topology
from runner.api.arguments import ArgumentError, check_arguments, signature_text
from runner.api.errors import ApiError
from runner.api.openapi import errors, json_body, json_response
from runner.api.validation import json_body as read_json_body
from runner.broker_config import error_chain
from runner.celery_app import SEND_TIMEOUT
from runner.task_catalogue import read_catalogue
from runner.store.task_runs import get_task_run

blueprint = Blueprint("tasks", __name__)

SEND_FIELDS = ("args", "kwargs", "countdown", "priority")
TASK_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UNREADABLE = "UNREADABLE"  # the state of a task whose stored result does not decode (not one of Celery's)


def _celery():
    return current_app.extensions["celery"]


def _read_json_object() -> dict:
    body = read_json_body()
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object: {\"args\": [...], \"kwargs\": {...}}", field=None)
    return body


def _send_options(body: dict) -> tuple[list, dict, dict]:
    unknown = sorted(set(body) - set(SEND_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; allowed: {', '.join(SEND_FIELDS)}", field=unknown[0])
    args, kwargs = body.get("args", []), body.get("kwargs", {})
    if not isinstance(args, list):
        raise ApiError(400, "'args' must be an array", field="args")
    if not isinstance(kwargs, dict):
        raise ApiError(400, "'kwargs' must be an object", field="kwargs")
    options: dict = {}
    if body.get("countdown") is not None:
        countdown = body["countdown"]
        # A worker holds a message with a countdown unacknowledged until it runs; held longer than the
        # visibility timeout (derived from this bound, runner.broker_config) it is delivered again.
        longest = current_app.extensions["dify_settings"].DIFY_LOCAL_MAX_COUNTDOWN
        if isinstance(countdown, bool) or not isinstance(countdown, (int, float)) or not math.isfinite(countdown) \
                or not 0 <= countdown <= longest:
            raise ApiError(400, f"'countdown' must be a number of seconds from 0 to {longest} "
                                "(DIFY_LOCAL_MAX_COUNTDOWN; a longer delay would outlive the broker's visibility "
                                "timeout and run twice: use a schedule)", field="countdown")
        options["countdown"] = countdown
    if body.get("priority") is not None:
        priority = body["priority"]
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
            raise ApiError(400, "'priority' must be an integer from 0 to 9 (on Redis 0 is served first)",
                           field="priority")
        options["priority"] = priority
    return args, kwargs, options


@blueprint.get("/v1/tasks")
def list_tasks():
    catalogue = read_catalogue()
    listed = []
    for name, queue in topology.ROUTES.items():
        definition = catalogue.lookup(name)
        if definition is None:  # routed, but no module defines it: it cannot be sent
            continue
        entry = {"name": name, "queue": queue,
                 "signature": None if definition.signature is None else signature_text(name, definition.signature),
                 "description": definition.description}
        if definition.signature is None:
            entry["unchecked"] = definition.unknown_because
        listed.append(entry)
    return jsonify({"tasks": listed})


@blueprint.post("/v1/tasks/<name>")
def send_task(name: str):
    # The definition comes from the task's source, read now (runner.task_catalogue): this process
    # never imports the task modules, so editing one restarts only the worker.
    definition = read_catalogue().lookup(name) if name in topology.ROUTES else None
    if definition is None:
        raise ApiError(404, f"unknown task {name!r}; GET /v1/tasks lists the tasks that can be sent")
    args, kwargs, options = _send_options(_read_json_object())
    if definition.signature is not None:
        try:
            check_arguments(name, definition.signature, definition.hints, args, kwargs)
        except ArgumentError as error:
            raise ApiError(400, str(error), field=error.field) from None
    # By name: the route (task_routes in runner.celery_app) picks the queue, as apply_async would.
    result = _send(name, args, kwargs, options)
    queue = topology.ROUTES[name]
    body = {"id": result.id, "task": name, "queue": queue, "state": "PENDING",
            "poll": url_for("tasks.get_task", task_id=result.id)}
    if definition.signature is None:
        body["unchecked"] = definition.unknown_because
    return jsonify(body), 202


def _send(name: str, args: list, kwargs: dict, options: dict) -> AsyncResult:
    """Send the task. A send the broker did not confirm in time (a full disk: it holds the reply to
    a write it cannot log yet) may still run: the 503 says so and gives the id to poll. kombu may
    have tried again after the timeout and met a refusal (MISCONF); the first try still counts."""
    task_id = uuid()
    unconfirmed: list[BaseException] = []

    def on_retry(error: BaseException, interval: float) -> None:
        if isinstance(error, (redis.TimeoutError, TimeoutError)):
            unconfirmed.append(error)
    try:
        return _celery().send_task(name, args=args, kwargs=kwargs, task_id=task_id,
                                   retry_policy={"errback": on_retry}, **options)
    except (redis.RedisError, OperationalError, OSError) as error:
        if unconfirmed or any(isinstance(link, (redis.TimeoutError, TimeoutError)) for link in error_chain(error)):
            raise ApiError(503, f"the broker did not confirm the send within {SEND_TIMEOUT:g} s (is its disk full? "
                                "GET /health says); it may still run it once it can write: poll the task",
                           id=task_id, poll=url_for("tasks.get_task", task_id=task_id)) from None
        raise


@blueprint.get("/v1/tasks/<task_id>")
def get_task(task_id: str):
    if not TASK_ID.match(task_id):
        raise ApiError(400, "a task id is 1 to 128 letters, digits and . _ : -", field="task")
    celery = _celery()
    result = AsyncResult(task_id, app=celery)
    record = get_task_run(celery.dify.database, task_id)
    try:
        return jsonify(_task_view(task_id, result, record))
    except (redis.ConnectionError, redis.TimeoutError, OperationalError):
        raise  # the broker is unreachable: a 503 (runner.api.errors)
    except Exception as error:
        # Any client with the broker's password may have written the result: Celery decodes it and
        # raises whatever its shape makes it raise (DecodeError, KeyError, TypeError, SecurityError …).
        cause = error.__cause__ if isinstance(error, DecodeError) and error.__cause__ else error
        return jsonify({"id": task_id, "state": UNREADABLE, "error": {
            "type": "UnreadableResult", "message": f"the result stored for this task cannot be read "
                                                   f"({type(cause).__name__}); it was not written by Celery"}})


def _task_view(task_id: str, result: AsyncResult, record: dict | None) -> dict:
    state = result.state  # PENDING also means "unknown", as Celery has it
    if not isinstance(state, str):  # Celery passes on whatever "status" the stored result holds
        raise TypeError(f"its status is {type(state).__name__}, not a state name")
    if state == "PENDING" and record and record["state"] == "STARTED":
        # The worker records starts in SQLite; Celery's own STARTED state would cost a Redis write
        # per task (task_track_started), which measurably slows the worker.
        state = "STARTED"
    body: dict = {"id": task_id, "state": state}
    if record:
        body.update({key: record[key] for key in ("name", "queue", "queued_at", "started_at", "finished_at",
                                                   "runtime", "attempts")})
    if state == "SUCCESS":
        body["result"] = result.result
    elif state in ("FAILURE", "RETRY"):
        error = result.result
        body["error"] = {"type": type(error).__name__, "message": str(error)}
        if result.traceback:
            body["error"]["traceback"] = result.traceback
    return body


SEND_BODY = {"type": "object", "additionalProperties": False, "properties": {
    "args": {"type": "array"}, "kwargs": {"type": "object"},
    "countdown": {"type": "number", "minimum": 0, "description": "seconds, at most DIFY_LOCAL_MAX_COUNTDOWN"},
    "priority": {"type": "integer", "minimum": 0, "maximum": 9}}}


def paths(settings) -> dict:
    """PATHS with the countdown's bound of these settings."""
    send = PATHS["/v1/tasks/{task}"]["post"]
    schema = send["requestBody"]["content"]["application/json"]["schema"]
    countdown = {**schema["properties"]["countdown"], "maximum": settings.DIFY_LOCAL_MAX_COUNTDOWN}
    schema = {**schema, "properties": {**schema["properties"], "countdown": countdown}}
    send = {**send, "requestBody": {**send["requestBody"], "content": {"application/json": {"schema": schema}}}}
    return {**PATHS, "/v1/tasks/{task}": {**PATHS["/v1/tasks/{task}"], "post": send}}


PATHS = {
    "/v1/tasks": {"get": {
        "summary": "Every task that can be sent: name, queue, signature (read from its source), description",
        "operationId": "listTasks",
        "responses": {"200": json_response("the tasks", {"type": "object", "required": ["tasks"],
                                                         "properties": {"tasks": {"type": "array"}}})}}},
    # One path item: OpenAPI counts /v1/tasks/{name} and /v1/tasks/{id} as the same path.
    "/v1/tasks/{task}": {
        "parameters": [{"name": "task", "in": "path", "required": True, "schema": {"type": "string"},
                        "description": "POST: a task's name (GET /v1/tasks lists them); GET: a sent task's id",
                        "example": "send_mail_task"}],
        "post": {
            "summary": "Send a task to its queue; arguments are checked against its signature first",
            "operationId": "sendTask",
            "requestBody": json_body({**SEND_BODY, "example": {"args": ["a@example.com", "Hello", "From the API"]}},
                                     required=False),
            "responses": {"202": json_response("queued: poll the URL in `poll`", {
                "type": "object", "required": ["id", "task", "queue", "state", "poll"]}),
                          **errors(400, 404, 413, 503)}},
        "get": {
            "summary": "A sent task's state, and its result or error once finished", "operationId": "getTask",
            "responses": {"200": json_response("its state (PENDING also means unknown, as in Celery)", {
                "type": "object", "required": ["id", "state"]}), **errors(400, 503)}},
    },
}
