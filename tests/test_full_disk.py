"""A full disk under the state folder (issue 16 point 8): the broker refuses writes (MISCONF) and
nothing crashes. The worker waits it out (also one started during the fault, which writes as it
connects) and carries on once there is room, and so does beat; an API started meanwhile is
ready; the API answers 503 with the reason; /health and `ps` say what is wrong; `up`'s own log
files say once that they cannot be written, no tracebacks; once the disk has room again every
task accepted with 202 runs and new ones are accepted.

The state folder is a small tmpfs of its own, so this needs root (mount): skipped otherwise,
failed under DIFY_LOCAL_REQUIRE_ROOT=1 (as .ci/run runs it)."""

from __future__ import annotations

import errno
import logging
import os
import resource
import subprocess
import threading
import time

import pytest

from tests.helpers import wait_until

MAIL = "/v1/tasks/send_mail_task"
DISK_FULL = "the broker refuses writes: its disk is full (MISCONF)"


def _needs_root(why: str) -> None:
    if os.environ.get("DIFY_LOCAL_REQUIRE_ROOT") == "1":
        pytest.fail(f"{why} (DIFY_LOCAL_REQUIRE_ROOT=1)")
    pytest.skip(why)


@pytest.fixture
def small_state_disk(project):
    """The project's state folder on a 20 MB tmpfs of its own (owner-only, as dify-local wants it)."""
    if os.geteuid() != 0:
        _needs_root("mounting a small disk for the state folder needs root")
    project.state.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m,mode=0700", "tmpfs", str(project.state)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        _needs_root(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield project.state
    finally:
        for proc in project.procs:  # nothing may hold the mount
            proc.cleanup()
        if subprocess.run(["umount", str(project.state)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(project.state)], capture_output=True)


def fill(path) -> None:
    """Write until the disk says it is full (unbuffered: a short write takes the last bytes)."""
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error


def send(project, n: int) -> tuple[int, dict]:
    started = time.monotonic()
    status, body = project.api.post(MAIL, {"args": [f"to{n}@example.com", "Hello", f"message {n}"]}, timeout=20)
    return status, {**(body if isinstance(body, dict) else {"raw": body}), "seconds": time.monotonic() - started}


def finished(project, task_id: str) -> bool:
    status, body = project.api.get(f"/v1/tasks/{task_id}")
    return status == 200 and body["state"] == "SUCCESS"


def test_a_full_disk_is_waited_out_and_reported_truthfully(project, small_state_disk):
    up = project.up("--no-reload", "--grace", "5")
    accepted: list[str] = []
    for n in range(5):  # before the fault
        status, body = send(project, n)
        assert status == 202, body
        accepted.append(body["id"])
    for task_id in accepted:
        wait_until(lambda task_id=task_id: finished(project, task_id), 30, f"task {task_id} to run")

    filler = small_state_disk / "filler"
    fill(filler)
    # the next write to the broker's log fails (the heartbeats write every second or two): from then on
    # it refuses writes, and /health says so
    def refusing() -> dict | None:
        status, body = project.api.get("/health")
        broker = (body or {}).get("checks", {}).get("broker", {})
        return body if status == 503 and broker.get("refusing_writes") else None
    health = wait_until(refusing, 30, "/health to report the broker refusing writes")
    assert "refusing writes: disk full" in health["checks"]["broker"]["error"], health

    # A worker started now writes as soon as it connects (kombu's unacked index): it waits, and does
    # not crash-loop. (Restarted while it holds no task: one it held would wait for the visibility
    # timeout. `restart` itself returns once the worker is ready again, after the fault.)
    before = len(up.lines)
    restart = project.start("restart", "worker")
    wait_until(lambda: "worker started" in "\n".join(up.lines[before:]), 30, "the new worker to start")
    before = next(n for n in range(before, len(up.lines)) if "worker started" in up.lines[n])  # its lines follow
    restarts = project.processes()["worker"]["restarts"]
    waiting = f"worker | WARNING dify_local.broker_writes: {DISK_FULL}"

    def waiting_or_crashed():
        status = project.processes()["worker"]["status"]
        return status in ("backoff", "failed") or waiting in "\n".join(up.lines[before:])
    wait_until(waiting_or_crashed, 30, "the new worker to wait for the broker (or to crash)")

    # beat and the API started now do not crash-loop either; the API can answer, so it is ready
    beat = project.start("restart", "beat")
    done = project.run("restart", "api", timeout=60)
    assert done.returncode == 0 and "api: ready" in done.stdout, done.stdout + done.stderr

    refused = 0
    for n in range(5, 25):
        status, body = send(project, n)
        assert status in (202, 503), (status, body)  # never a 500
        if status == 202:  # (the broker's log may take a write now and then: a file elsewhere shrank)
            accepted.append(body["id"])
            continue
        refused += 1
        assert body["error"].startswith(DISK_FULL), body
        assert body["seconds"] < 5, body  # at once, not after kombu's retries
    assert refused, "every send was accepted while the broker refused writes"

    rows = project.processes()
    assert rows["worker"]["status"] not in ("backoff", "failed") and rows["worker"]["restarts"] == restarts, \
        (rows["worker"], up.output)
    assert rows["beat"]["status"] not in ("backoff", "failed"), rows["beat"]
    assert rows["broker"]["degraded"].startswith("refusing writes: disk full (MISCONF"), rows["broker"]
    table = project.run("ps").stdout
    assert "degraded" in table and "broker is refusing writes: disk full" in table, table
    status, body = project.api.get("/health")
    assert status == 503 and not body["checks"]["broker"]["ok"], body

    filler.unlink()  # room again
    assert restart.wait(60) == 0, restart.output  # the new worker is ready
    assert beat.wait(60) == 0, beat.output
    wait_until(lambda: project.api.status("/health") == 200, 60, "/health to be ok once the disk has room")
    for n in range(25, 30):
        status, body = send(project, n)
        assert status == 202, body
        accepted.append(body["id"])
    for task_id in accepted:
        try:
            wait_until(lambda task_id=task_id: finished(project, task_id), 60,
                       f"task {task_id} (accepted with 202) to run")
        except AssertionError as error:
            raise AssertionError(f"{error}: {project.api.get(f'/v1/tasks/{task_id}')}\n{up.output}") from None

    rows = project.processes()
    assert rows["worker"]["status"] == "ready" and rows["worker"]["restarts"] == restarts, rows["worker"]
    assert rows["beat"]["status"] == "ready" and rows["beat"]["restarts"] == 1, rows["beat"]
    assert not rows["broker"].get("degraded"), rows["broker"]
    assert "degraded" not in project.run("ps").stdout
    new_worker = "\n".join(up.lines[before:])
    assert new_worker.count(waiting) == 1, new_worker  # said once, however long it waited
    assert "worker | WARNING dify_local.broker_writes: the broker accepts writes again" in new_worker, new_worker
    output = up.output
    assert "Logging error" not in output and "Unrecoverable error" not in output, output
    assert "cannot write the log file" in output and "is written again" in output, output


def test_a_refused_write_is_tried_again_once_the_broker_can_write(project, caplog):
    """What the worker's clients do (runner.write_refusal), on a broker whose log file may not grow
    (the file-size limit, as a full disk): a refused SET (a task's result) and a refused transaction
    (kombu's unacked index) wait, said once, and go through once the broker can write, each once."""
    import redis

    from runner import write_refusal
    from tests.helpers import dify_local, port_open

    write_refusal.register()
    argv = ["bash", "-c", 'ulimit -S -f 64; exec "$@"', "bash", *dify_local(), "serve", "broker"]
    broker = project.start(argv=argv)
    wait_until(lambda: port_open(project.broker_port), 60, "the embedded broker to listen")
    options = {"host": "127.0.0.1", "port": project.broker_port, "password": project.broker_password, "db": 1}
    plain = redis.Redis(**options, socket_timeout=1)
    for n in range(200):  # until the log file refuses a write (its reply held: a timeout; or MISCONF)
        try:
            plain.set(f"fill{n}", "v" * 1000)
        except (redis.TimeoutError, write_refusal.BrokerRefusesWrites):
            break
    plain = redis.Redis(**options, socket_timeout=5)
    wait_until(lambda: plain.info("persistence")["aof_last_write_status"] == "err", 10, "the log to refuse writes")
    with pytest.raises(write_refusal.BrokerRefusesWrites):
        plain.set("refused", "x")

    waiting = write_refusal.WaitingRedis(**options)
    done: dict[str, object] = {}

    def store_result():
        done["set"] = waiting.set("celery-task-meta-1", "SUCCESS")

    def index_unacked():
        done["transaction"] = waiting.pipeline().hset("unacked", "tag", "message").zadd("unacked_index", {"tag": 1}) \
            .execute()
    threads = [threading.Thread(target=store_result), threading.Thread(target=index_unacked)]
    with caplog.at_level(logging.WARNING, logger="dify_local.broker_writes"):
        for thread in threads:
            thread.start()
        wait_until(lambda: write_refusal.WAITING in caplog.text, 10, "the wait to be said")
        assert all(thread.is_alive() for thread in threads) and not done
        assert plain.get("celery-task-meta-1") is None and plain.hgetall("unacked") == {}

        pid = int(plain.info("server")["process_id"])
        hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, hard))  # room again
        for thread in threads:
            thread.join(30)
        assert done == {"set": True, "transaction": [1, 1]}, done
        assert plain.get("celery-task-meta-1") == b"SUCCESS" and plain.hgetall("unacked") == {b"tag": b"message"}
        assert caplog.text.count(write_refusal.WAITING) == 1 and caplog.text.count(write_refusal.RESUMED) == 1
    broker.cleanup()
