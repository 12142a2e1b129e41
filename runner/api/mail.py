"""The local outbox over HTTP: the mails the mail tasks delivered, newest first."""

from __future__ import annotations


from flask import Blueprint, current_app, jsonify

from runner.api.errors import ApiError
from runner.api.openapi import errors, json_response, query
from runner.api.validation import query_integer, query_matching, query_parameters
from runner.capped_files import FileTooLarge, shown_size
from runner.outbox import MAX_MAIL, list_mail, read_mail
from runner.settings.kinds import EMAIL
from runner.state import StatePaths

blueprint = Blueprint("mail", __name__)

LIST_PARAMETERS = ("to", "limit")
MAX_LIMIT = 1000


def _paths() -> StatePaths:
    return StatePaths(current_app.extensions["dify_settings"].state_dir)


@blueprint.get("/v1/mail")
def list_outbox():
    query_parameters(LIST_PARAMETERS)
    limit = query_integer("limit", 100, 1, MAX_LIMIT)
    to = query_matching("to", EMAIL, "an e-mail address")
    total, mails = list_mail(_paths(), to, limit)
    return jsonify({"total": total, "mail": mails})


@blueprint.get("/v1/mail/<name>")
def get_mail(name: str):
    try:
        mail = read_mail(_paths(), name)
    except FileTooLarge:
        raise ApiError(413, f"mail {name!r} is over {shown_size(MAX_MAIL)}; read it in the outbox folder") from None
    except ValueError as error:
        raise ApiError(400, str(error), field="name") from None
    if mail is None:
        raise ApiError(404, f"no mail {name!r} in the outbox; GET /v1/mail lists them")
    return jsonify(mail)


MAIL_SUMMARY = {"type": "object", "required": ["name", "from", "to", "subject", "date", "message_id", "size"],
                "properties": {"name": {"type": "string"}, "from": {"type": "string"}, "to": {"type": "string"},
                               "subject": {"type": "string"}, "date": {"type": "string"},
                               "message_id": {"type": "string"}, "size": {"type": "integer"}}}
PATHS = {
    "/v1/mail": {"get": {
        "summary": "The local outbox, newest first", "operationId": "listMail",
        "parameters": [
            query("to", {"type": "string", "format": "email"}, "only mail to this address"),
            query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "how many (default 100)")],
        "responses": {"200": json_response("how many match, and the newest of them", {
            "type": "object", "required": ["total", "mail"],
            "properties": {"total": {"type": "integer"}, "mail": {"type": "array", "items": MAIL_SUMMARY}}}),
                      **errors(400)}}},
    "/v1/mail/{name}": {"get": {
        "summary": "One mail of the outbox with its text and HTML parts", "operationId": "getMail",
        "parameters": [{"name": "name", "in": "path", "required": True, "description": "its file name (.eml)",
                        "schema": {"type": "string"}, "example": "20261124T060644.123456Z-1f0c.eml"}],
        "responses": {"200": json_response("the mail", {
            "type": "object", "required": [*MAIL_SUMMARY["required"], "text", "html"],
            "properties": {**MAIL_SUMMARY["properties"], "text": {"type": "string", "nullable": True},
                           "html": {"type": "string", "nullable": True}}}),
                      **errors(400, 404, 413)}}},
}
