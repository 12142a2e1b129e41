"""The API's OpenAPI document, served at GET /openapi.json.

Each blueprint module describes its own routes beside them, in a `PATHS` dict (OpenAPI path item
objects by path); this module puts them together with what they share. A test checks that every
route of the app is described and that nothing described is missing from the app.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from flask import Blueprint, current_app, jsonify

from runner import __version__

blueprint = Blueprint("openapi", __name__)

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}},
         "additionalProperties": True}
REASONS = {400: "the request is invalid: the message names the field and what is allowed",
           404: "no such thing", 405: "method not allowed", 409: "conflicts with the current state",
           413: "the body is too large", 415: "unsupported media type",
           503: "the broker or the metadata database is unreachable"}


def errors(*statuses: int) -> dict[str, Any]:
    """Response objects for error statuses, all with the JSON error body."""
    return {str(status): {"description": REASONS.get(status, "error"),
                          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for status in statuses}


def query(name: str, schema: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    """An optional query parameter."""
    parameter = {"name": name, "in": "query", "required": False, "schema": schema}
    return {**parameter, "description": description} if description else parameter


def json_response(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema or {"type": "object"}}}}


def json_body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def build_document(modules: list[ModuleType], settings: Any = None) -> dict[str, Any]:
    """`settings`: for a module whose description depends on them (a `paths(settings)` function)."""
    paths: dict[str, Any] = {}
    for module in modules:
        described = module.paths(settings) if settings is not None and hasattr(module, "paths") else \
            getattr(module, "PATHS", {})
        for path, item in described.items():
            paths.setdefault(path, {}).update(item)
    return {
        "openapi": "3.0.3",
        "info": {"title": "dify-local API", "version": __version__,
                 "description": "Dify's asynchronous side on one machine: send tasks, poll results, and the "
                                "flows of each queue. Every error is JSON: {\"error\": message}."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": {"Error": ERROR}},
    }


@blueprint.get("/openapi.json")
def openapi():
    return jsonify(current_app.extensions["openapi"])


PATHS = {"/openapi.json": {"get": {"summary": "This document", "operationId": "openapi",
                                   "responses": {"200": json_response("the OpenAPI document")}}}}
