"""The embedded broker as Celery needs it: password enforced, errors keep the connection, Lua."""

from __future__ import annotations

import socket
import time

import pytest
import redis


def read_until(raw: socket.socket, expected: bytes, timeout: float = 5) -> bytes:
    """Replies may come in several segments: read until `expected` is whole (or time runs out)."""
    raw.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < len(expected) and time.monotonic() < deadline:
        data += raw.recv(1024)
    return data


@pytest.fixture
def broker(project):
    project.serve_broker()
    return project.broker_port


def test_password_is_required(broker):
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=broker, protocol=2).set("key", "value")  # no AUTH: NOAUTH
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=broker, password="wrong").ping()
    raw = socket.create_connection(("127.0.0.1", broker))
    raw.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
    assert read_until(raw, b"-NOAUTH Authentication required.\r\n") == b"-NOAUTH Authentication required.\r\n"
    raw.sendall(b"*2\r\n$4\r\nAUTH\r\n$12\r\ndifyai123456\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
    assert read_until(raw, b"+OK\r\n$-1\r\n") == b"+OK\r\n$-1\r\n"  # the refused SET wrote nothing
    raw.close()


def test_error_replies_keep_the_connection(broker):
    client = redis.Redis(port=broker, password="difyai123456", single_connection_client=True)
    client.set("text", "x")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        client.lpush("text", "y")
    with pytest.raises(redis.exceptions.NoScriptError):
        client.evalsha("0" * 40, 0)
    assert client.get("text") == b"x"  # same connection, still served
    assert client.client_id() == client.client_id()


def test_lua_scripts_as_kombu_uses_them(broker):
    client = redis.Redis(port=broker, password="difyai123456")
    script = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert script(keys=["n"], args=[2]) == 2 and script(keys=["n"], args=[3]) == 5  # EVALSHA after NOSCRIPT
    lock = client.lock("unacked_mutex", timeout=5)
    assert lock.acquire(blocking=False) and lock.release() is None
