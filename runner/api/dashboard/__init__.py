"""The dashboard at /dashboard: one HTML page, its stylesheet and script, served from this package's
static folder (no build step, nothing from a CDN). The page reads the JSON endpoints every few
seconds; it never writes but through the API's own POSTs (a failed task's Retry)."""

from __future__ import annotations

from flask import Blueprint

from runner.api.openapi import errors

blueprint = Blueprint("dashboard", __name__, static_folder="static", static_url_path="/dashboard/static")

# The page runs only its own script and style, talks only to this API and cannot be framed: even
# if some user data slipped past the page's escaping, a browser would not run it.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@blueprint.get("/dashboard")
def dashboard():
    return blueprint.send_static_file("index.html")


@blueprint.after_request
def _secure(response):
    response.headers.update(SECURITY_HEADERS)
    return response


PATHS = {
    "/dashboard": {"get": {
        "summary": "The dashboard: processes, queues, workers, beat's schedule, task runs, failed tasks, metrics "
                   "and the outbox, refreshing by itself",
        "operationId": "dashboard",
        "responses": {"200": {"description": "the page", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
    "/dashboard/static/{filename}": {"get": {
        "summary": "The dashboard's script and stylesheet", "operationId": "dashboardFile",
        "parameters": [{"name": "filename", "in": "path", "required": True, "schema": {"type": "string"},
                        "example": "dashboard.js"}],
        "responses": {"200": {"description": "the file", "content": {"*/*": {"schema": {"type": "string"}}}},
                      **errors(404)}}},
}
