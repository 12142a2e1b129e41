"""Health and queue depth."""

from __future__ import annotations

import time

from flask import Blueprint, current_app, jsonify

from runner import topology
from runner.api.openapi import errors, json_response
from runner.monitor.queues import queue_depths
from runner.settings import mask_url
from runner.store.migrations import schema_state

blueprint = Blueprint("status", __name__)


def _check_broker(celery) -> dict:
    started = time.perf_counter()
    try:
        with celery.connection_for_read() as connection:
            connection.default_channel.client.ping()
    except Exception as error:
        return {"ok": False, "url": mask_url(celery.conf.broker_url), "error": f"{type(error).__name__}: {error}"}
    return {"ok": True, "url": mask_url(celery.conf.broker_url),
            "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


def _check_database(celery) -> dict:
    database = celery.dify.database
    try:
        state = schema_state(database)
    except Exception as error:
        return {"ok": False, "path": str(database.path), "error": f"{type(error).__name__}: {error}"}
    if not state.current:
        return {"ok": False, "path": str(database.path), "error": f"pending migrations: {', '.join(state.pending)}"}
    return {"ok": True, "path": str(database.path), "migrations": len(state.applied)}


@blueprint.get("/health")
def health():
    celery = current_app.extensions["celery"]
    checks = {"broker": _check_broker(celery), "database": _check_database(celery)}
    ok = all(check["ok"] for check in checks.values())
    return jsonify({"status": "ok" if ok else "unavailable", "checks": checks}), 200 if ok else 503


@blueprint.get("/v1/queues")
def queues():
    celery = current_app.extensions["celery"]
    depths = queue_depths(celery, topology.QUEUE_NAMES)
    return jsonify({"queues": [{"name": spec.name, "priority": spec.priority.label, "depth": depths[spec.name]}
                               for spec in topology.QUEUES]})


CHECK = {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}}
PATHS = {
    "/health": {"get": {
        "summary": "Whether the broker and the metadata database answer", "operationId": "health",
        "responses": {"200": json_response("both answer", {"type": "object", "required": ["status", "checks"],
                                                           "properties": {"status": {"type": "string"},
                                                                          "checks": {"type": "object"}}}),
                      "503": json_response("one of them does not (the body says which and why)")}}},
    "/v1/queues": {"get": {
        "summary": "The 16 queues with their priority class and depth", "operationId": "queues",
        "responses": {"200": json_response("the queues", {"type": "object", "required": ["queues"],
                                                          "properties": {"queues": {"type": "array"}}}),
                      **errors(503)}}},
}
