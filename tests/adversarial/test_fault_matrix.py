"""The same faults against every role of a running `up` (issue 16): kill -9, SIGSTOP held past the
heartbeat deadline then SIGCONT, and the broker's port taken by another listener while it is down.
For each: `dify-local ps` and /health tell the truth while it lasts (the role named, not "ok"), `up`
restarts or resumes it, and afterwards a task sent through the API runs and /health is ok again.

One stack serves every case: each leaves it healthy (its last check), and each begins by waiting for
that. Found here: a SIGSTOPped worker or beat was "ready" in ps and "ok" in /health for as long as
it stayed stopped (nothing exits, and `up` probed readiness only at start); ps now reads the
process's state and says "suspended"."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from tests.conftest import made_project
from tests.helpers import wait_until

pytestmark = pytest.mark.processes  # (stacks of their own, from module fixtures: never `unit`)

ROLES = ("api", "worker", "beat", "broker")
# Longer than the worker's heartbeat deadline (3 × its 2 s interval + 5 s: runner/monitor/heartbeats.py)
# and beat's (3 × 1 s + 5 s): a check that trusted heartbeats alone would have seen the stop by then.
HOLD = 12.0
TASK = "process_trace_tasks"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with made_project(tmp_path_factory.mktemp("matrix")) as project:
        project.up("--no-reload", env={"DIFY_LOCAL_VISIBILITY_TIMEOUT": "5"})
        yield project


def health(project, path: str = "/health", timeout: float = 10) -> tuple[int, dict | None]:
    """(status, body) of GET path, or (0, None) when the API does not answer within `timeout`."""
    try:
        return project.api.get(path, timeout=timeout)
    except OSError:  # refused, reset or timed out (urllib's errors are OSErrors)
        return 0, None


def healthy(project) -> dict[str, dict]:
    """Waits for every role ready and /health 200; the rows of ps."""
    wait_until(lambda: all(row["status"] == "ready" for row in project.processes().values()), 60, "every role ready")
    wait_until(lambda: health(project)[0] == 200, 60, "/health to be 200")
    return project.processes()


def a_task_runs(project) -> None:
    status, body = project.api.post(f"/v1/tasks/{TASK}", {"args": ["matrix", "after a fault", {}]}, timeout=30)
    assert status == 202, body
    wait_until(lambda: project.api.get(body["poll"])[1]["state"] == "SUCCESS", 60, f"task {body['id']} to run")


def recovered(project) -> None:
    healthy(project)
    a_task_runs(project)
    assert health(project)[0] == 200


def named_in_health(project, role: str) -> tuple[int, dict] | None:
    """/health while `role` is down: a 503 whose checks name it (the API down answers nothing)."""
    status, body = health(project, timeout=15)
    if status != 503:
        return None
    processes = body["checks"].get("processes", {})
    named = role in processes.get("failed", []) + processes.get("not_ready", [])
    if role == "broker":
        named = named or not body["checks"]["broker"]["ok"]
    return (status, body) if named else None


@pytest.mark.parametrize("role", ROLES)
def test_kill_9(stack, role):
    pid = healthy(stack)[role]["pid"]
    os.kill(pid, signal.SIGKILL)
    # ps never calls the dead process ready: it shows it down, or already a new one
    row = wait_until(lambda: (lambda row: row if row["pid"] != pid or row["status"] != "ready" else None)(
        stack.processes()[role]), 10, f"ps to see {role} (pid {pid}) killed")
    assert row["pid"] != pid, row
    def restarted() -> bool:
        row = stack.processes()[role]
        return row["status"] == "ready" and row["pid"] not in (None, pid)
    wait_until(restarted, 60, f"up to restart {role}")
    assert stack.processes()[role]["restarts"] >= 1
    recovered(stack)


@pytest.mark.parametrize("role", ROLES)
def test_sigstop_past_the_heartbeat_deadline_then_sigcont(stack, role):
    pid = healthy(stack)[role]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        wait_until(lambda: stack.processes()[role]["status"] == "suspended", 10, f"ps to say {role} is suspended")
        row = stack.processes()[role]
        assert row["pid"] == pid and row["ready"] is False, row
        table = stack.run("ps").stdout
        assert any(line.split()[:3] == [role, str(pid), "suspended"] for line in table.splitlines()), table
        if role == "api":
            # it answers nothing: up holds its socket, so a request waits instead of being refused
            assert health(stack, "/health/api", timeout=2)[0] == 0
        else:
            status, body = wait_until(lambda: named_in_health(stack, role), 30, f"/health to name {role}")
            if role != "broker":
                assert f"{role} is suspended" in body["checks"]["processes"]["error"], body
        while time.monotonic() - stopped_at < HOLD:  # the fault lasts past the heartbeat deadlines
            assert stack.processes()[role]["status"] == "suspended"
            time.sleep(1)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: stack.processes()[role]["status"] == "ready", 30, f"{role} to be ready again once resumed")
    assert stack.processes()[role]["pid"] == pid  # resumed, not replaced
    recovered(stack)


def take_port(port: int) -> socket.socket | None:
    try:
        return socket.create_server(("127.0.0.1", port))
    except OSError:  # the killed broker's socket is not closed yet
        return None


def test_the_brokers_port_taken_while_it_is_down(stack):
    rows = healthy(stack)
    pid, restarts = rows["broker"]["pid"], rows["broker"]["restarts"]
    up = stack.procs[-1]
    said = len(up.lines)
    os.kill(pid, signal.SIGKILL)
    squatter = wait_until(lambda: take_port(stack.broker_port), 10, "the killed broker's port", interval=0.01)
    try:
        # up tries again and fails: it says why, and ps and /health say the broker is down
        wait_until(lambda: stack.processes()["broker"]["restarts"] >= restarts + 2, 60, "up to try the broker twice")
        assert stack.processes()["broker"]["status"] != "ready"
        new = "\n".join(up.lines[said:])
        assert str(stack.broker_port) in new and ("in use" in new or "cannot listen" in new), new
        wait_until(lambda: named_in_health(stack, "broker"), 30, "/health to name the broker")
    finally:
        squatter.close()
    if stack.processes()["broker"]["status"] == "failed":  # five crashes within a minute: up stopped trying
        assert stack.run("start", "broker").returncode == 0
    recovered(stack)
