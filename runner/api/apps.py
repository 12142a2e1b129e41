"""Apps: create, read what an app holds, add messages, and delete an app with everything it owns."""

from __future__ import annotations

import time
import uuid

from flask import Blueprint, jsonify

from runner.api.errors import ApiError
from runner.api.openapi import errors, json_body, json_response
from runner.api.validation import ID, celery, database, identifier, json_object, sent, text

blueprint = Blueprint("apps", __name__)

ROLES = ("user", "assistant", "system")
MAX_MESSAGE = 100_000  # characters


def _holdings(db, app_id: str) -> dict[str, int]:
    def count(sql: str) -> int:
        return db.execute(sql, [app_id]).fetchone()[0]

    return {
        "conversations": count("SELECT COUNT(*) FROM conversations WHERE app_id = ?"),
        "messages": count("SELECT COUNT(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                          "WHERE c.app_id = ?"),
        "workflow_runs": count("SELECT COUNT(*) FROM workflow_runs WHERE app_id = ?"),
        "traces": count("SELECT COUNT(*) FROM traces WHERE app_id = ?"),
        "schedules": count("SELECT COUNT(*) FROM workflow_schedules WHERE app_id = ?"),
        "triggers": count("SELECT COUNT(*) FROM workflow_triggers WHERE app_id = ?"),
    }


@blueprint.post("/v1/apps")
def create_app():
    body = json_object(("id", "name"), required=("name",))
    name = text(body, "name", 200)
    app_id = identifier(body["id"], "id") if "id" in body else str(uuid.uuid4())
    with database().transaction() as db:
        if db.execute("SELECT 1 FROM apps WHERE id = ?", [app_id]).fetchone():
            raise ApiError(409, f"an app {app_id!r} exists already", field="id")
        db["apps"].insert({"id": app_id, "name": name, "created_at": time.time()})
        db.execute("DELETE FROM deleted_apps WHERE app_id = ?", [app_id])  # created again on purpose
    return jsonify({"id": app_id, "name": name}), 201


@blueprint.get("/v1/apps/<app_id>")
def get_app(app_id: str):
    identifier(app_id, "app_id")
    with database().connect() as db:
        rows = list(db.query("SELECT * FROM apps WHERE id = ?", [app_id]))
        if not rows:
            raise ApiError(404, f"no app {app_id!r}")
        return jsonify({**rows[0], "holds": _holdings(db, app_id)})


@blueprint.post("/v1/apps/<app_id>/messages")
def add_message(app_id: str):
    identifier(app_id, "app_id")
    body = json_object(("conversation_id", "role", "content"), required=("conversation_id", "role", "content"))
    conversation_id = identifier(body["conversation_id"], "conversation_id")
    if body["role"] not in ROLES:
        raise ApiError(400, f"'role' must be one of {', '.join(ROLES)}", field="role")
    content = text(body, "content", MAX_MESSAGE)
    with database().connect() as db:
        owner = db.execute("SELECT app_id FROM conversations WHERE id = ?", [conversation_id]).fetchone()
    if owner and owner[0] != app_id:
        raise ApiError(409, f"conversation {conversation_id!r} belongs to another app", field="conversation_id")
    result = celery().send_task("save_message_task", args=[app_id, conversation_id, body["role"], content])
    return jsonify(sent(result, "save_message_task")), 202


@blueprint.delete("/v1/apps/<app_id>")
def delete_app(app_id: str):
    identifier(app_id, "app_id")
    with database().connect() as db:
        exists = db.execute("SELECT 1 FROM apps WHERE id = ?", [app_id]).fetchone()
        if not exists and not any(_holdings(db, app_id).values()):
            raise ApiError(404, f"no app {app_id!r}")
    result = celery().send_task("remove_app_and_related_data_task", args=[app_id])
    return jsonify(sent(result, "remove_app_and_related_data_task", app_id=app_id)), 202


def _path_id(name: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": ID.pattern}}


PATHS = {
    "/v1/apps": {
        "post": {"summary": "Create an app", "operationId": "createApp",
                 "requestBody": json_body({"type": "object", "required": ["name"], "additionalProperties": False,
                                           "properties": {"name": {"type": "string", "maxLength": 200},
                                                          "id": {"type": "string", "pattern": ID.pattern}}}),
                 "responses": {"201": json_response("created"), **errors(400, 409, 413)}}},
    "/v1/apps/{app_id}": {
        "parameters": [_path_id("app_id")],
        "get": {"summary": "An app with counts of what it holds", "operationId": "getApp",
                "responses": {"200": json_response("the app"), **errors(400, 404)}},
        "delete": {"summary": "Delete an app with everything it owns (app_deletion queue)", "operationId": "deleteApp",
                   "responses": {"202": json_response("accepted: poll the task"), **errors(400, 404)}}},
    "/v1/apps/{app_id}/messages": {
        "parameters": [_path_id("app_id")],
        "post": {"summary": "Store a message in a conversation of the app (conversation queue)",
                 "operationId": "addMessage",
                 "requestBody": json_body({"type": "object", "required": ["conversation_id", "role", "content"],
                                           "additionalProperties": False,
                                           "properties": {"conversation_id": {"type": "string",
                                                                              "pattern": ID.pattern},
                                                          "role": {"type": "string", "enum": list(ROLES)},
                                                          "content": {"type": "string", "maxLength": MAX_MESSAGE}}}),
                 "responses": {"202": json_response("accepted: poll the task"), **errors(400, 409, 413)}}},
}
