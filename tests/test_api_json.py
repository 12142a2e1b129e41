"""JSON in and out of the API: what Python's json module accepts but JSON (or UTF-8) does not is a
400 naming the field, on every JSON endpoint; and no response carries NaN or Infinity."""

from __future__ import annotations

import json
import urllib.request

import pytest
from celery import Celery

from runner import strict_json
from tests.helpers import wait_until


@pytest.fixture
def api(project):
    project.serve_broker()
    proc = project.start("serve", "api")
    wait_until(lambda: project.api.status("/health/api") == 200, 30, "the API to answer")
    yield project.api
    assert "Traceback" not in proc.output, proc.output


DEEP = b"[" * 1000 + b"]" * 1000
# (raw body, the field named, words of the message)
REFUSED = [
    (b'{"args": ' + DEEP + b"}", None, "deeper than 64 levels"),
    (b'{"args": [' + b"[" * 70 + b"]" * 70 + b"]}", "args", "deeper than 64 levels"),
    (b'{"args": ["\\ud800", "s", "b"]}', "args[0]", "lone surrogate"),
    (b'{"args": ["a@b.co", "s\\u0000", "b"]}', "args[1]", "NUL"),
    (b'{"kwargs": {"to": "a@b.co", "subject": "s", "body": "b", "\\udfff": 1}}', "kwargs", "lone surrogate"),
    (b'{"args": [], "args": ["a@b.co", "s", "b"]}', "args", "appears twice"),
    (b'{"args": ["a@b.co", "s", "b"], "countdown": NaN}', "countdown", "NaN"),
    (b'{"args": ["a@b.co", "s", "b"], "countdown": -Infinity}', "countdown", "Infinity"),
    (b'{"args": ["a@b.co", "s", "b"], "countdown": 1e400}', "countdown", "finite"),
    (b'{"args": [1' + b"0" * 5000 + b', "s", "b"]}', "args[0]", "64 bits"),
]


@pytest.mark.parametrize("raw, field, words", REFUSED, ids=[case[2] + "-" + str(case[1]) for case in REFUSED])
def test_json_that_is_not_json_is_a_400_naming_the_field(api, raw, field, words):
    status, body = api.request("POST", "/v1/tasks/send_mail_task", raw=raw)
    assert status == 400, body
    assert words in body["error"] and body.get("field") == field, body


ENDPOINTS = [  # every route that reads a JSON body, with a body it would otherwise accept
    ("POST", "/v1/tasks/send_mail_task", {"args": ["a@b.co", "s", "b"]}),
    ("POST", "/v1/datasets", {"name": "n"}),
    ("POST", "/v1/workflows/run", {"graph": {"nodes": [{"id": "s", "type": "start"}]}}),
    ("POST", "/v1/triggers", {"graph": {"nodes": [{"id": "s", "type": "start"}]}}),
    ("POST", "/v1/trigger-subscriptions", {"provider": "p"}),
    ("POST", "/v1/apps", {"name": "n"}),
    ("PUT", "/v1/plugin-index/translator", {"version": "1.0.0"}),
    ("POST", "/v1/plugins/check-upgrades", {}),
]


@pytest.mark.parametrize("method, path, good", ENDPOINTS, ids=[case[1] for case in ENDPOINTS])
def test_every_json_endpoint_refuses_deep_nesting_surrogates_and_nul(api, method, path, good):
    for raw, field in [
        (b"[" * 1000 + b"]" * 1000, None),
        (json.dumps({**good, "extra": "\ud800"}).encode(), "extra"),
        (json.dumps({**good, "extra": "\x00"}).encode(), "extra"),
    ]:
        status, body = api.request(method, path, raw=raw)
        assert status == 400 and body.get("field") == field, (raw[:60], body)


def test_surrogate_pairs_and_unicode_edges_are_accepted(api):
    status, body = api.post("/v1/datasets", {"name": "\U0001F600 \u05d0\u05d1 e\u0301 \u202e"})
    assert status == 201, body
    assert body["name"] == "\U0001F600 \u05d0\u05d1 e\u0301 \u202e"


def test_no_response_carries_nan_or_infinity(project, api):
    """A result another Celery client stored (kombu's JSON writes NaN) comes out as null."""
    app = Celery("nan-writer", broker=project.broker_url, backend=project.broker_url)
    app.backend.store_result("nan-result", {"ratio": float("nan"), "top": [float("inf"), 1.5]}, "SUCCESS")
    with urllib.request.urlopen(f"{api.base}/v1/tasks/nan-result", timeout=10) as response:
        raw = response.read().decode()
    assert "NaN" not in raw and "Infinity" not in raw, raw
    body = strict_json.loads(raw)
    assert body["result"] == {"ratio": None, "top": [None, 1.5]}, body


def test_broker_values_any_client_wrote_are_read_to_show_never_to_fail(project, api):
    """A queue's head message and beat's keys are JSON another client may have written: 10,000
    nested arrays, or bytes that are not JSON, leave /v1/queues and /v1/beat a 200."""
    import redis

    from runner.broker_config import BEAT_HEARTBEAT_KEY, BEAT_SCHEDULE_KEY

    client = redis.Redis.from_url(project.broker_url)
    deep = b"[" * 10_000 + b"]" * 10_000
    client.lpush("mail", deep, b"\xff not json")
    client.set(BEAT_HEARTBEAT_KEY, deep)
    client.set(BEAT_SCHEDULE_KEY, b"{" * 10_000)
    status, body = api.get("/v1/queues")
    assert status == 200 and {q["name"]: q for q in body["queues"]}["mail"]["depth"] == 2, body
    status, body = api.get("/v1/beat")
    assert status == 200, body
    doctor = project.run("doctor")
    assert "Traceback" not in doctor.stdout + doctor.stderr, doctor.stdout + doctor.stderr


UNREADABLE = [  # what another client may have SET as a task's result
    b"[" * 10_000 + b"]" * 10_000, b"\xff not json", b'{"status": "SUCCESS"', b"[1, 2]", b'"text"', b"{}",
    b'{"status": "FAILURE", "result": {"exc_module": "os", "exc_type": "system", "exc_message": ["id"]}}',
    b'{"status": "FAILURE", "result": "not an exception"}', b'{"status": "FAILURE", "result": [1]}',
    b'{"status": "SUCCESS", "result": {"a": NaN}}', b'{"status": 7}',
]


@pytest.mark.parametrize("stored", UNREADABLE, ids=[raw[:40].decode("utf-8", "replace") for raw in UNREADABLE])
def test_a_result_another_client_stored_unreadable_is_reported_not_a_500(project, api, stored):
    import redis

    redis.Redis.from_url(project.broker_url).set("celery-task-meta-unreadable", stored)
    status, body = api.get("/v1/tasks/unreadable")
    assert status == 200, body
    assert body["state"] == "UNREADABLE" and "cannot be read" in body["error"]["message"] or \
        body["state"] in ("PENDING", "SUCCESS", "FAILURE"), body
