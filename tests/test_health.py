"""/health and `dify-local ps` tell the truth about a failed worker or broker: under `up` from its view of
every process, without it from the heartbeats on the broker. /health/api (the API alone) stays 200."""

from __future__ import annotations

import os
import signal
import socket

from tests.helpers import wait_until

STACK = "broker: dify-local serve broker\napi: dify-local serve api\nbeat: dify-local serve beat\n"


def ps_table(project) -> dict[str, list[str]]:
    result = project.run("ps")
    assert result.returncode == 0, result.stderr
    return {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:] if line.strip()}


def take_port(port: int) -> socket.socket | None:
    try:
        return socket.create_server(("127.0.0.1", port))
    except OSError:  # still held by the process being killed
        return None


def test_a_worker_whose_code_does_not_load_is_failed_in_ps_and_in_health(project):
    (project.dir / "Procfile").write_text(STACK + "worker: dify-local serve worker -I dify_local_no_such_module\n")
    project.up()
    wait_until(lambda: project.processes()["worker"]["status"] == "failed", 60, "the worker to be marked failed")
    assert ps_table(project)["worker"][1:4] == ["-", "failed", "no"]  # no pid, failed, not ready
    status, body = project.api.get("/health")
    assert status == 503, body
    processes = body["checks"]["processes"]
    assert processes["ok"] is False and processes["failed"] == ["worker"], processes
    assert "worker failed" in processes["error"] and "dify-local start worker" in processes["error"], processes
    assert {processes["processes"][name] for name in ("broker", "api", "beat")} == {"ready"}
    assert body["checks"]["broker"]["ok"] and body["checks"]["database"]["ok"]
    assert project.api.status("/health/api") == 200  # the API itself can answer
    assert project.run("stop", "worker").returncode == 0  # stopped on purpose: listed, not a fault
    status, body = project.api.get("/health")
    assert status == 200 and body["checks"]["processes"]["stopped"] == ["worker"], body


def test_a_broker_that_cannot_come_back_is_failed_in_ps_and_in_health(project):
    (project.dir / "Procfile").write_text(STACK + "worker: dify-local serve worker\n")
    project.up()
    assert project.api.status("/health") == 200
    pid = project.processes()["broker"]["pid"]
    os.kill(pid, signal.SIGKILL)
    # something else takes its port: every restart fails, the crash loop marks it failed
    squatter = wait_until(lambda: take_port(project.broker_port), 10, "the killed broker's port to be free",
                          interval=0.01)
    try:
        wait_until(lambda: project.processes()["broker"]["status"] == "failed", 120, "the broker to be marked failed")
        assert ps_table(project)["broker"][1:4] == ["-", "failed", "no"]
        status, body = project.api.get("/health", timeout=30)
        assert status == 503, body
        assert body["checks"]["broker"]["ok"] is False
        assert "broker" in body["checks"]["processes"]["failed"], body
    finally:
        squatter.close()


def test_outside_up_health_follows_the_heartbeats_of_workers_and_beat(project):
    project.serve_broker()
    project.start("serve", "api")
    worker = project.start("serve", "worker")
    wait_until(lambda: project.api.status("/health/api") == 200, 30, "the API to answer")

    def health() -> tuple[int, dict]:
        status, body = project.api.get("/health", timeout=30)
        assert "processes" not in body["checks"], body  # no `up` runs here
        return status, body

    beating = wait_until(lambda: (lambda answer: answer if answer[1]["checks"]["workers"]["ok"] else None)(health()),
                         60, "the worker's heartbeat")
    status, body = beating
    assert status == 503 and body["checks"]["beat"]["ok"] is False, body  # no beat: periodic tasks are not sent
    assert "no beat is running" in body["checks"]["beat"]["error"], body

    project.start("serve", "beat")
    wait_until(lambda: health()[0] == 200, 60, "/health to be 200 with a worker and beat")

    worker.signal(signal.SIGKILL)  # killed: it cannot remove its heartbeat key
    status, body = wait_until(lambda: (lambda answer: answer if answer[0] == 503 else None)(health()), 60,
                              "/health to see the worker's heartbeat stop")
    workers = body["checks"]["workers"]
    assert workers["ok"] is False and list(workers["stale"]) and not workers["live"], workers
    assert "killed or hung" in workers["error"], workers
    assert body["checks"]["beat"]["ok"] is True
    assert project.api.status("/health/api") == 200
