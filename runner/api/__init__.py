"""The API's Flask app factory: built from settings and a Celery app, never at import time."""

from __future__ import annotations

import logging
import time

from celery import Celery
from flask import Flask, g, request

from runner.api import (apps, dashboard, datasets, failed, mail, metrics, openapi, plugins, stack, status, task_runs,
                        tasks, workflows)
from runner.api.errors import install_error_handlers
from runner.api.json_output import FiniteJSONProvider
from runner.api.inspection import WorkerInspections
from runner.api.request_guard import install_request_guard
from runner.settings import Settings

MAX_JSON_BODY = 1024 * 1024  # bytes; task arguments travel through the broker, keep them small
QUIET_PATHS = ("/health", "/health/api")  # polled by `up` and monitors; not worth a log line each
# The dashboard's refreshes (a handful of GETs every few seconds) mark themselves with this header:
# logged only when they fail, so the API's log keeps the requests someone made.
POLL_HEADER = "X-Dashboard-Poll"

log = logging.getLogger("dify_local.api")


def largest_body(settings: Settings) -> int:
    """The largest request body any route takes (a document upload, a plugin package, each with
    its form's overhead): what the HTTP server reads at most. Each route keeps its own limit."""
    largest = max(MAX_JSON_BODY, settings.UPLOAD_FILE_SIZE_LIMIT * datasets.MEGABYTE, settings.PLUGIN_MAX_PACKAGE_SIZE)
    return largest + datasets.MULTIPART_OVERHEAD


def create_api(settings: Settings, celery: Celery) -> Flask:
    app = Flask("dify_local.api")
    app.config["MAX_CONTENT_LENGTH"] = MAX_JSON_BODY
    app.json = FiniteJSONProvider(app)
    app.json.sort_keys = False
    app.extensions["celery"] = celery
    app.extensions["dify_settings"] = settings
    app.extensions["worker_inspections"] = WorkerInspections(celery)
    # each a blueprint with its routes' OpenAPI description (PATHS)
    modules = [status, tasks, datasets, workflows, apps, plugins, mail, metrics, failed, stack, task_runs, dashboard,
               openapi]
    for module in modules:
        app.register_blueprint(module.blueprint)
    app.extensions["openapi"] = openapi.build_document(modules, settings)
    install_error_handlers(app)
    install_request_guard(app, settings)

    @app.before_request
    def _start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def _log_request(response):
        polled = request.method == "GET" and POLL_HEADER in request.headers and response.status_code < 400
        if request.path not in QUIET_PATHS and not polled:
            elapsed = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
            log.info("%s %s %s (%.1f ms)", request.method, request.path, response.status_code, elapsed)
        return response

    return app
