"""`dify-local broker info`: what the broker in use holds, from the embedded broker and from a real
redis-server alike; one clear line and a non-zero exit when it cannot be reached or refuses the
password."""

from __future__ import annotations

import json
import re
import signal
import socket

import redis
from celery import Celery
from kombu import Connection

from runner.broker.session import compiled_session
from runner.topology import QUEUE_NAMES


def fill(url: str) -> Connection:
    """Three messages waiting on `dataset` (one of them in a priority sub-list), one on `retention`,
    a plain key on db 0, and one message on `mail` taken by a consumer and not acknowledged: the
    returned connection holds it until closed."""
    sender = Celery("filler", broker=url)
    for priority in (None, None, 9):
        sender.send_task("document_indexing_task", args=["kb-1", "a.txt", "text"], queue="dataset", priority=priority)
    sender.send_task("clean_task_runs_task", queue="retention")
    sender.close()
    plain = redis.Redis.from_url(url.rsplit("/", 1)[0] + "/0")
    plain.set("greeting", "hello")
    plain.close()
    consumer = Connection(url)
    queue = consumer.SimpleQueue("mail")
    queue.put({"to": "dev@example.com"})
    queue.get(timeout=10)  # delivered, not acknowledged: kept in kombu's `unacked` hash
    return consumer


def queue_row(output: str, name: str) -> list[str]:
    return next(line.split() for line in output.splitlines() if line.split()[:1] == [name])


def assert_one_clear_line(done, *needles: str) -> None:
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dify-local: cannot use"), done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in done.stderr


def test_embedded_broker_info_shows_keys_queues_and_persistence(project):
    project.serve_broker()
    consumer = fill(project.broker_url)
    try:
        text = project.run("broker", "info")
        as_json = project.run("broker", "info", "--json")
    finally:
        consumer.close()
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert f"redis://:****@127.0.0.1:{project.broker_port}/1 (embedded)" in out
    assert project.broker_password not in out + as_json.stdout
    loop = "compiled" if compiled_session()[0] is not None else "python"  # the default where it is built
    assert "dify-local embedded broker (fakeredis" in out and f", {loop} read loop)" in out
    assert re.search(r"^address\s+127\.0\.0\.1:%d$" % project.broker_port, out, re.M)
    assert re.search(r"^clients\s+\d+ connected", out, re.M)
    assert re.search(r"^persistence\s+append-only log \S+appendonly\.aof, \d+", out, re.M)
    assert re.search(r"^keys\s+db0: 1 · db1: \d+", out, re.M)
    assert queue_row(out, "dataset")[1:] == ["normal", "3", "0"]
    assert queue_row(out, "retention")[1:] == ["low", "1", "0"]
    assert queue_row(out, "mail")[1:] == ["normal", "0", "1"]
    assert queue_row(out, "(all")[2:] == ["4", "1"]

    report = json.loads(as_json.stdout)
    assert report["embedded"] is True and report["server"]["name"] == "dify-local embedded broker"
    assert report["address"] == f"127.0.0.1:{project.broker_port}"
    assert isinstance(report["uptime_seconds"], int) and report["clients"]["connected"] >= 1
    assert report["memory"]["used_bytes"] > 0
    assert report["persistence"]["aof_enabled"] is True and report["persistence"]["aof_size"] >= 0
    assert report["keyspace"]["0"] == {"keys": 1, "expires": 0}
    assert [queue["name"] for queue in report["queues"]] == list(QUEUE_NAMES)
    depths = {queue["name"]: (queue["pending"], queue["unacked"]) for queue in report["queues"]}
    assert depths["dataset"] == (3, 0) and depths["retention"] == (1, 0) and depths["mail"] == (0, 1)
    assert sum(pending for pending, _ in depths.values()) == 4 and report["unacked"] == 1


def test_real_redis_info_shows_its_version_keys_and_queues(project, redis_server):
    url = f"{redis_server}/1"
    consumer = fill(url)
    try:
        text = project.run("broker", "info", env={"CELERY_BROKER_URL": url})
        as_json = project.run("broker", "info", "--json", env={"CELERY_BROKER_URL": url})
    finally:
        consumer.close()
    assert text.returncode == 0, text.stderr
    out = text.stdout
    port = int(redis_server.rsplit(":", 1)[1])
    assert f"redis://:****@127.0.0.1:{port}/1 (external)" in out and "realredispw" not in out
    assert re.search(r"^server\s+Redis \d+\.\d+\.\d+ \(standalone, master\), pid \d+", out, re.M)
    assert re.search(r"^persistence\s+AOF off; RDB last save ok", out, re.M)
    assert re.search(r"^keys\s+db0: 1 · db1: \d+", out, re.M)
    assert queue_row(out, "dataset")[1:] == ["normal", "3", "0"]
    assert queue_row(out, "mail")[1:] == ["normal", "0", "1"]

    report = json.loads(as_json.stdout)
    assert report["embedded"] is False and report["server"]["name"] == "Redis"
    assert report["address"] == f"127.0.0.1:{port}"
    assert report["persistence"]["aof_enabled"] is False and report["persistence"]["rdb_last_save"] > 0
    assert report["keyspace"]["0"]["keys"] == 1
    assert report["unacked"] == 1


def test_unreachable_broker_is_one_line_naming_the_url_and_what_to_do(project):
    done = project.run("broker", "info")  # nothing started: the embedded broker is not running
    assert_one_clear_line(done, f"redis://:****@127.0.0.1:{project.broker_port}/1", "dify-local up")
    assert project.broker_password not in done.stderr  # made for the broker that starts next


def test_wrong_password_for_the_embedded_broker_names_redis_password(project):
    project.serve_broker()
    done = project.run("broker", "info", env={"REDIS_PASSWORD": "not-the-password"})
    assert_one_clear_line(done, "the password was refused", "REDIS_PASSWORD",
                          f"redis://:****@127.0.0.1:{project.broker_port}/1")
    assert "not-the-password" not in done.stderr


def test_wrong_or_missing_password_for_real_redis_names_the_url(project, redis_server):
    wrong = redis_server.replace("realredispw", "guessed") + "/1"
    done = project.run("broker", "info", env={"CELERY_BROKER_URL": wrong})
    assert_one_clear_line(done, "the password was refused", "CELERY_BROKER_URL", "redis://:****@127.0.0.1:")
    assert "guessed" not in done.stderr
    none = redis_server.replace(":realredispw@", "") + "/1"
    done = project.run("broker", "info", env={"CELERY_BROKER_URL": none})
    assert_one_clear_line(done, "asks for a password", "CELERY_BROKER_URL")


def test_client_connects_and_disconnects_are_logged_at_debug_level_only(project):
    """The broker's own lines reach the console; a client coming and going is not one of them but
    at LOG_LEVEL=DEBUG (Celery opens and closes connections all the time)."""
    for level in ("INFO", "DEBUG"):
        proc = project.serve_broker(env={"LOG_LEVEL": level})
        with socket.create_connection(("127.0.0.1", project.broker_port), timeout=10) as client:
            port = client.getsockname()[1]
            client.sendall(b"AUTH %s\r\nPING\r\n" % project.broker_password.encode())
            replies = b""
            while replies.count(b"\r\n") < 2:
                replies += client.recv(100)
            assert replies == b"+OK\r\n+PONG\r\n"
        if level == "DEBUG":
            proc.wait_for_line(rf"client 127\.0\.0\.1:{port} disconnected", timeout=10)
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "embedded broker stopped" in proc.output  # the broker's own lines, at either level
        logged = re.search(rf"client 127\.0\.0\.1:{port} connected", proc.output)
        assert bool(logged) == (level == "DEBUG"), (level, proc.output)
