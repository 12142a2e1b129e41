"""The API's HTTP server (runner/roles/api_server.py) against clients that stall: a stalled client
holds a connection, never one of the threads that answer, and the server closes it in bounded time."""

from __future__ import annotations

import json
import socket
import time

import pytest

from runner.roles.api_server import MIN_RATE, REQUEST_TIMEOUT, connection_limit
from tests.helpers import wait_until
from tests.slow_clients import KINDS, StalledClients, closed_by_peer

STALLED = 100


@pytest.fixture
def api(project):
    project.serve_broker()
    proc = project.start("serve", "api")
    wait_until(lambda: project.api.status("/health/api") == 200, 30, "the API to be healthy")
    yield project.api
    assert "Traceback" not in proc.output, proc.output


@pytest.mark.parametrize("kind", list(KINDS))
def test_health_answers_while_100_clients_stall_and_the_server_closes_them(project, api, kind):
    stalled = StalledClients(project.api_port, kind, STALLED)
    try:
        wait_until(lambda: stalled.open() == STALLED, 10, "the stalled connections to be open")
        for _ in range(3):  # (a deadline, not a threshold: the development server never answered)
            assert api.get("/health/api", timeout=30)[0] == 200
        assert stalled.open() == STALLED  # answered while they stall, not once they were closed
        # the server closes them: REQUEST_TIMEOUT after the accept (generously: the machine is busy)
        wait_until(lambda: stalled.open() == 0, 6 * REQUEST_TIMEOUT, f"the server to close the {kind} connections")
    finally:
        stalled.close()
    assert api.get("/health/api")[0] == 200


def test_a_full_server_closes_the_connection_waiting_longest_to_let_a_new_client_in(project, api):
    """Past CONNECTION_LIMIT open connections, waitress on its own stops accepting until one closes."""
    limit = connection_limit()  # as the API computes it (this raises our soft limit on open files as well)
    stalled = StalledClients(project.api_port, "silent", limit + 20)
    try:
        assert api.get("/health/api", timeout=30)[0] == 200
        closed = [index for index, sock in enumerate(stalled.socks) if closed_by_peer(sock)]
        # the oldest, one for each newer connection, were closed to make room (without that, waitress
        # stops accepting until the deadlines close connections, a second's worth at a time: 129 here)
        assert closed == list(range(len(closed))), closed
        assert 20 <= len(closed) <= 40, len(closed)
    finally:
        stalled.close()


def test_a_slow_but_steady_upload_is_not_cut_off(api):
    """A body arriving faster than MIN_RATE gets a second per MIN_RATE bytes beyond REQUEST_TIMEOUT."""
    chunk = MIN_RATE // 4  # sent four times a second: MIN_RATE bytes a second
    seconds = REQUEST_TIMEOUT + 2
    body = b'{"args": ["a@b.co", "s", "' + b"x" * int(chunk * 4 * seconds) + b'"]}'
    port = int(api.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/tasks/send_mail_task HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                     b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        for start in range(0, len(body), chunk):
            sock.sendall(body[start:start + chunk])
            time.sleep(0.25)  # the client's pace, not a wait for the server
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 202"), answer[:300]


BAD_REQUESTS = [
    # (raw request, status, text the JSON error must contain)
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n", 431,
     "exceeds max_header"),
    (b"POST /v1/tasks/send_mail_task HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000000\r\n\r\n", 413,
     "exceeds max_body"),
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: lots\r\n\r\n", 400, "Content-Length"),
]


@pytest.mark.parametrize("raw,status,message", BAD_REQUESTS, ids=["headers", "body", "length"])
def test_what_the_server_refuses_itself_is_a_json_error(api, raw, status, message):
    port = int(api.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"%d" % status, answer[:300]
    assert b"Content-Type: application/json" in head, head
    assert message in json.loads(body)["error"], body


def test_a_request_naming_no_host_is_answered_as_by_the_listening_address(api):
    """HTTP/1.0 needs no Host: the loopback check then sees the address the API listens on."""
    port = int(api.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /health/api HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.split(b" ", 2)[1] == b"200", answer[:300]
