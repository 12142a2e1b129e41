"""Reading and checking request bodies: every mistake is a 400 naming the field and what is allowed."""

from __future__ import annotations

import math
import re
from typing import Any

from flask import current_app, request

from runner import strict_json
from runner.api.errors import ApiError

ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
ID_RULE = "1 to 128 letters, digits and . _ : -"
WHOLE_NUMBER = re.compile(r"^[0-9]{1,9}$")


def json_body(cache: bool = False) -> Any:
    """The body parsed as JSON (an empty body is {}); JSON that does not parse, or that holds what
    runner.strict_json refuses, is a 400 naming the field."""
    raw = request.get_data(cache=cache)
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(raw) >= limit:
        # A body sent without a length (chunked) is cut at the limit by werkzeug, silently: the
        # first megabyte was parsed, and "not valid JSON" blamed the client for the cut.
        raise ApiError(413, f"the body is larger than {limit} bytes")
    if not raw.strip():
        return {}
    try:
        return strict_json.loads(raw)
    except strict_json.JsonRefused as error:
        raise ApiError(400, str(error), field=error.field) from None  # None: the body as a whole


def json_object(allowed: tuple[str, ...] | None = None, required: tuple[str, ...] = ()) -> dict:
    """The body as a JSON object (empty body: {}), with only `allowed` fields and all `required` ones."""
    body = json_body()
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", field=None)
    if allowed is not None:
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r}; allowed: {', '.join(allowed)}", field=unknown[0])
    for name in required:
        if name not in body:
            raise ApiError(400, f"the field {name!r} is required", field=name)
    return body


def identifier(value: Any, field: str) -> str:
    if not isinstance(value, str) or not ID.match(value):
        raise ApiError(400, f"{field!r} must be {ID_RULE}", field=field)
    return value


def optional_identifier(body: dict, field: str) -> str | None:
    value = body.get(field)
    return None if value in (None, "") else identifier(value, field)


def text(body: dict, field: str, max_length: int, default: str | None = None) -> str:
    value = body.get(field, default)
    if not isinstance(value, str) or not value.strip() or len(value) > max_length:
        raise ApiError(400, f"{field!r} must be a non-empty string of at most {max_length} characters", field=field)
    return value


def obj(body: dict, field: str) -> dict:
    value = body.get(field, {})
    if not isinstance(value, dict):
        raise ApiError(400, f"{field!r} must be a JSON object", field=field)
    return value


def integer(body: dict, field: str, default: int, minimum: int, maximum: int) -> int:
    value = body.get(field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or int(value) != value or not minimum <= value <= maximum:
        raise ApiError(400, f"{field!r} must be an integer from {minimum} to {maximum}", field=field)
    return int(value)


def boolean(body: dict, field: str, default: bool) -> bool:
    value = body.get(field, default)
    if not isinstance(value, bool):
        raise ApiError(400, f"{field!r} must be true or false", field=field)
    return value


def query_parameters(allowed: tuple[str, ...]) -> None:
    """Refuse a query parameter the route does not take (a typo would otherwise be ignored)."""
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r}; allowed: {', '.join(allowed)}", field=unknown[0])


def query_matching(name: str, pattern: re.Pattern, rule: str) -> str | None:
    """An optional query parameter that must match `pattern`; `rule` says what it must be."""
    value = request.args.get(name)
    if value is not None and not pattern.match(value):
        raise ApiError(400, f"{name!r} must be {rule}", field=name)
    return value


def query_integer(name: str, default: int, minimum: int, maximum: int) -> int:
    """A whole-number query parameter (digits only: int() alone would take ' 5', '1_0' and refuse '²')."""
    raw = request.args.get(name)
    if raw is None:
        return default
    if not WHOLE_NUMBER.match(raw) or not minimum <= int(raw) <= maximum:
        raise ApiError(400, f"the query parameter {name!r} must be an integer from {minimum} to {maximum}",
                       field=name)
    return int(raw)


def celery():
    return current_app.extensions["celery"]


def database():
    return celery().dify.database


def settings():
    return current_app.extensions["dify_settings"]


def sent(result, task: str, **extra) -> dict:
    """The body of a 202 for a task sent: its id and where to poll it."""
    return {"task_id": result.id, "task": task, "state": "PENDING", "poll": f"/v1/tasks/{result.id}", **extra}
