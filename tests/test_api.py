"""The API against a real broker and SQLite file: bad input gets a 4xx JSON error, never a 5xx."""

from __future__ import annotations

import signal
import socket
import threading

import pytest

from tests.helpers import wait_until


@pytest.fixture
def api(project):
    project.serve_broker()
    proc = project.start("serve", "api")
    wait_until(lambda: project.api.status("/health/api") == 200, 30, "the API to be healthy")
    yield project.api
    assert "Traceback" not in proc.output, proc.output


BAD_SENDS = [
    # (path, raw body, status, text the error must contain)
    ("/v1/tasks/no_such_task", b"{}", 404, "unknown task 'no_such_task'"),
    ("/v1/tasks/send_mail_task", b"{not json", 400, "not valid JSON"),
    ("/v1/tasks/send_mail_task", b"\xff\xfe", 400, "not valid JSON"),
    ("/v1/tasks/send_mail_task", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/tasks/send_mail_task", b'"text"', 400, "must be a JSON object"),
    ("/v1/tasks/send_mail_task", b'{"args": [], "queue": "mail"}', 400, "unknown field 'queue'"),
    ("/v1/tasks/send_mail_task", b'{"args": "a,b"}', 400, "'args' must be an array"),
    ("/v1/tasks/send_mail_task", b'{"kwargs": [1]}', 400, "'kwargs' must be an object"),
    ("/v1/tasks/send_mail_task", b'{"args": ["a@b.co"]}', 400, "missing a required argument: 'subject'"),
    ("/v1/tasks/send_mail_task", b'{"args": ["a@b.co", "s", "b", "extra"]}', 400, "too many positional arguments"),
    ("/v1/tasks/send_mail_task", b'{"kwargs": {"to": "a@b.co", "subject": "s", "body": "b", "cc": "x"}}', 400,
     "unexpected keyword argument 'cc'"),
    ("/v1/tasks/send_mail_task", b'{"args": [42, "s", "b"]}', 400,
     "argument 'to' must be a string, got an integer; the task is send_mail_task(to: str, subject: str, body: str)"),
    ("/v1/tasks/rag_pipeline_run_task", b'{"args": ["text"], "kwargs": {"chunk_size": "big"}}', 400,
     "argument 'chunk_size' must be an integer, got a string"),
    ("/v1/tasks/rag_pipeline_run_task", b'{"args": ["text", true]}', 400, "argument 'chunk_size' must be an integer"),
    ("/v1/tasks/process_trace_tasks", b'{"args": ["app", "n", [1]]}', 400, "argument 'data' must be an object"),
    ("/v1/tasks/send_mail_task", b'{"args": ["a@b.co", "s", "b"], "priority": 10}', 400, "'priority' must be"),
    ("/v1/tasks/send_mail_task", b'{"args": ["a@b.co", "s", "b"], "priority": "high"}', 400, "'priority' must be"),
    ("/v1/tasks/send_mail_task", b'{"args": ["a@b.co", "s", "b"], "countdown": -1}', 400, "'countdown' must be"),
    ("/v1/tasks/send_mail_task", b'{"args": ["a@b.co", "s", "b"], "countdown": "soon"}', 400, "'countdown' must be"),
    # a longer countdown would outlive the visibility timeout derived from DIFY_LOCAL_MAX_COUNTDOWN
    ("/v1/tasks/send_mail_task", b'{"args": ["a@b.co", "s", "b"], "countdown": 301}', 400,
     "'countdown' must be a number of seconds from 0 to 300 (DIFY_LOCAL_MAX_COUNTDOWN"),
    ("/v1/tasks/send_mail_task", b'{"args": ["a@b.co", "s", "b"], "countdown": 1e400}', 400,
     "'countdown' is a number too large"),
]


@pytest.mark.parametrize("path,raw,status,message", BAD_SENDS, ids=[case[3][:40] for case in BAD_SENDS])
def test_bad_send_is_a_4xx_with_a_message(api, path, raw, status, message):
    got, body = api.request("POST", path, raw=raw)
    assert got == status, body
    assert message in body["error"], body


def test_oversized_body_is_413(api):
    got, body = api.request("POST", "/v1/tasks/send_mail_task", raw=b'{"args": ["' + b"x" * (2 * 1024 * 1024) + b'"]}')
    assert got == 413, body
    assert "error" in body


def test_unknown_routes_methods_and_ids_are_json_4xx(api):
    assert api.get("/nowhere") == (404, api.get("/nowhere")[1]) and "error" in api.get("/nowhere")[1]
    status, body = api.request("PUT", "/v1/tasks/send_mail_task", raw=b"{}")
    assert status == 405 and "error" in body
    status, body = api.get("/v1/tasks/not%20an%20id")
    assert status == 400 and "task id" in body["error"]
    status, body = api.get("/v1/tasks/" + "a" * 129)
    assert status == 400


def test_send_then_poll_and_queue_depths(api):
    status, body = api.post("/v1/tasks/send_mail_task", {"args": ["a@b.co", "s", "b"], "priority": 6})
    assert status == 202 and body["queue"] == "mail"
    status, polled = api.get(body["poll"])
    assert status == 200 and polled["state"] == "PENDING"
    api.post("/v1/tasks/send_mail_task", {"args": ["a@b.co", "s", "b"]})
    status, depths = api.get("/v1/queues")
    assert status == 200 and len(depths["queues"]) == 16
    by_name = {queue["name"]: queue for queue in depths["queues"]}
    # no worker runs here: both wait, one of them in the priority sub-list
    assert by_name["mail"]["depth"] == 2 and by_name["retention"]["priority"] == "low"
    status, listed = api.get("/v1/tasks")
    assert status == 200 and {"name": "send_mail_task", "queue": "mail"}.items() <= listed["tasks"][
        [t["name"] for t in listed["tasks"]].index("send_mail_task")].items()


def test_broker_down_is_503_not_500(project, api):
    broker = project.procs[0]
    broker.signal(signal.SIGTERM)
    broker.wait(20)
    status, body = api.get("/health")
    assert status == 503 and body["checks"]["broker"]["ok"] is False and body["checks"]["database"]["ok"] is True
    status, body = api.get("/v1/queues")
    assert status == 503 and "broker" in body["error"]
    status, body = api.post("/v1/tasks/send_mail_task", {"args": ["a@b.co", "s", "b"]}, timeout=60)
    assert status == 503 and "broker" in body["error"]


class DroppingListener(threading.Thread):
    """Stands on a port in a broker's place: accepts each connection, counts it, closes it."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.server = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.accepted = 0

    def run(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:  # closed
                return
            self.accepted += 1
            connection.close()


def test_a_broker_that_drops_connections_is_asked_once_per_request(project, api):
    """The broker's reads try once and answer 503: kombu's own retries (2 s, then 4 s) held each
    request for six seconds and three connections."""
    broker = project.procs[0]
    broker.signal(signal.SIGTERM)
    broker.wait(20)
    listener = DroppingListener(project.broker_port)
    listener.start()
    try:
        # (/v1/workers asks its four inspections at once: one connection each)
        reads = {"/health": 1, "/v1/queues": 1, "/v1/queues?history=5": 1, "/v1/beat": 1, "/v1/workers": 4}
        for path, connections in reads.items():
            before = listener.accepted
            status, body = api.get(path)
            assert status == 503 and "broker" in str(body), (path, body)  # (/health: in its checks)
            # (the listener's thread may count the last accept a moment after the 503 went out)
            wanted = before + connections
            wait_until(lambda wanted=wanted: listener.accepted >= wanted, 10, f"{path}: {connections} connections",
                       interval=0.01)
            assert listener.accepted - before == connections, (path, listener.accepted - before)
    finally:
        listener.server.close()


def test_a_broker_that_accepts_and_never_answers_is_a_503_not_a_hung_request(project, api):
    """Something on the broker's port that never answers (a hung broker): each read gives up after
    READ_TIMEOUT instead of holding the request, and the API thread answering it, for good."""
    broker = project.procs[0]
    broker.signal(signal.SIGTERM)
    broker.wait(20)
    silent = socket.create_server(("127.0.0.1", project.broker_port))  # accepts (the backlog), never reads
    try:
        for path in ("/health/api", "/health", "/v1/queues", "/v1/beat"):
            status, body = api.get(path, timeout=60)
            assert status == 503 and "broker" in str(body), (path, body)
    finally:
        silent.close()


def test_pages_of_other_sites_cannot_change_anything_through_a_browser(api):
    """Any page in the user's browser can reach loopback; a form or text/plain post needs no CORS
    preflight. Cross-origin changes and foreign Host names are refused; curl and scripts are not."""
    body = b'{"args": ["victim@example.com", "hi", "from a web page"]}'
    plain = {"Content-Type": "text/plain"}
    base = api.base.removeprefix("http://")
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Origin": f"http://{base}.evil.example"}):
        status, answer = api.request("POST", "/v1/tasks/send_mail_task", raw=body, headers={**plain, **headers})
        assert status == 403 and "cross-origin POST refused" in answer["error"], (headers, status, answer)
    status, answer = api.request("POST", "/v1/failed/1/retry", headers={"Origin": "https://evil.example"})
    assert status == 403
    status, answer = api.request("GET", "/v1/queues", headers={"Host": f"evil.example:{base.rsplit(':', 1)[1]}"})
    assert status == 403 and "answers only to localhost" in answer["error"]
    assert mail_depth(api) == 0  # nothing was sent (no worker runs here: a sent task would wait)
    # the same page (the dashboard), a script without Origin, and localhost names are served
    for headers in ({"Origin": f"http://{base}", "Sec-Fetch-Site": "same-origin"}, {},
                    {"Host": f"localhost:{base.rsplit(':', 1)[1]}"}):
        status, answer = api.request("POST", "/v1/tasks/send_mail_task", raw=body, headers={**plain, **headers})
        assert status == 202, (headers, status, answer)
    assert mail_depth(api) == 3


def mail_depth(api) -> int:
    return next(queue["depth"] for queue in api.get("/v1/queues")[1]["queues"] if queue["name"] == "mail")
