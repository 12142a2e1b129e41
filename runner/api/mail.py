"""The local outbox over HTTP: the mails the mail tasks delivered, newest first."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from runner.api.errors import ApiError
from runner.outbox import list_mail, read_mail
from runner.settings.kinds import EMAIL
from runner.state import StatePaths

blueprint = Blueprint("mail", __name__)

LIST_PARAMETERS = ("to", "limit")
MAX_LIMIT = 1000


def _outbox():
    return StatePaths(current_app.extensions["dify_settings"].state_dir).outbox


@blueprint.get("/v1/mail")
def list_outbox():
    unknown = sorted(set(request.args) - set(LIST_PARAMETERS))
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r}; allowed: {', '.join(LIST_PARAMETERS)}")
    raw_limit = request.args.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise ApiError(400, f"'limit' must be a whole number from 1 to {MAX_LIMIT}")
    to = request.args.get("to")
    if to is not None and not EMAIL.match(to):
        raise ApiError(400, "'to' must be an e-mail address")
    total, mails = list_mail(_outbox(), to, int(raw_limit))
    return jsonify({"total": total, "mail": mails})


@blueprint.get("/v1/mail/<name>")
def get_mail(name: str):
    try:
        mail = read_mail(_outbox(), name)
    except ValueError as error:
        raise ApiError(400, str(error)) from None
    if mail is None:
        raise ApiError(404, f"no mail {name!r} in the outbox; GET /v1/mail lists them")
    return jsonify(mail)
