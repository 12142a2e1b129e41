"""The supervisor with real processes: crashes, restarts from another terminal, graceful and cold
stops of a worker, and `down` leaving no process of the tree behind."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import psutil

from runner.celery_app import create_celery_app
from runner.settings import load_settings
from tests.helpers import REPO, wait_until

STACK = "broker: dify-local serve broker\napi: dify-local serve api\nbeat: dify-local serve beat\n"


def slow_worker(project, extra: str = "") -> dict[str, str]:
    """A Procfile whose worker also runs tests.support.slow_tasks; the env to import them."""
    (project.dir / "Procfile").write_text(
        STACK + f"worker: dify-local serve worker -I tests.support.slow_tasks {extra}\n")
    return {"PYTHONPATH": str(REPO)}


def client(project, env: dict | None = None):
    import tests.support.slow_tasks  # noqa: F401  (registers tests.sleep with the client)

    return create_celery_app(load_settings(project.dir, environ={**project.env, **(env or {})}))


def traces(folder) -> list[str]:
    return sorted(path.name.split(".")[0] for path in folder.glob("*.*")) if folder.exists() else []


def test_killed_worker_is_restarted_and_the_others_keep_running(project):
    stack = project.up()
    before = project.processes()
    os.kill(before["worker"]["pid"], signal.SIGKILL)
    wait_until(lambda: project.processes()["worker"]["pid"] != before["worker"]["pid"], 30, "the worker to come back")
    status, sent = project.api.post("/v1/tasks/rag_pipeline_run_task", {"args": ["sent during the outage"]})
    assert status == 202
    wait_until(lambda: project.api.get(sent["poll"])[1]["state"] == "SUCCESS", 60, "the task sent in the outage")
    wait_until(lambda: project.processes()["worker"]["status"] == "ready", 30, "the worker to be ready again")
    after = project.processes()
    assert after["worker"]["restarts"] == 1 and after["worker"]["status"] == "ready"
    assert after["worker"]["last_exit"] == -9
    for name in ("broker", "api", "beat"):
        assert after[name]["pid"] == before[name]["pid"] and after[name]["restarts"] == 0
    assert "worker was killed by SIGKILL; restarting in 1 s" in stack.output


def test_process_crashing_at_start_backs_off_then_fails_and_the_stack_stays_up(project):
    (project.dir / "Procfile").write_text(
        STACK + "worker: dify-local serve worker\n"
        "flaky: python3 -c \"import sys; print('cannot start: no config'); sys.exit(3)\"\n")
    stack = project.up(timeout=120)
    for delay in (1, 2, 4, 8):
        assert f"flaky exited with status 3; restarting in {delay} s" in stack.output
    assert "flaky exited with status 3 and has crashed 5 times in 60 s: marked failed" in stack.output
    assert "cannot start: no config" in stack.output  # its last lines are shown
    assert "FAILED: flaky" in [line for line in stack.lines if "ready in" in line][-1]
    rows = project.processes()
    assert rows["flaky"]["status"] == "failed" and rows["flaky"]["restarts"] == 4
    assert all(rows[name]["status"] == "ready" for name in ("broker", "api", "worker", "beat"))
    status, health = project.api.get("/health")  # the rest runs, and /health says what does not
    assert status == 503 and health["checks"]["processes"]["failed"] == ["flaky"], health
    assert project.api.status("/health/api") == 200


def test_restart_from_another_terminal_loses_no_task(project, tmp_path):
    env = slow_worker(project, "-c 2")
    project.up(env=env)
    app = client(project, env)
    folder = tmp_path / "runs"
    try:
        results = [app.tasks["tests.sleep"].apply_async((0.1, str(folder), f"t{n}"), queue="dataset")
                   for n in range(40)]
        wait_until(lambda: len(traces(folder)) >= 8, 60, "some tasks to finish")
        restart = project.run("restart", "worker", timeout=120)
        assert restart.returncode == 0, restart.stderr
        assert "restarting worker" in restart.stdout and "worker: ready (pid" in restart.stdout
        assert [result.get(timeout=120) for result in results] == [f"t{n}" for n in range(40)]
    finally:
        app.close()
    assert traces(folder) == sorted(f"t{n}" for n in range(40))  # every task ran, and ran once
    assert project.processes()["worker"]["restarts"] == 1


def test_graceful_stop_lets_a_task_finish_and_a_cold_one_returns_to_its_queue(project, tmp_path):
    env = slow_worker(project, "-c 1")
    (project.dir / "local_config").mkdir()
    (project.dir / "local_config" / "processes.toml").write_text("[worker]\nstop_timeout = 7\n")
    project.up(env=env)
    app = client(project, env)
    folder = tmp_path / "runs"

    def started(task_id: str) -> bool:
        with sqlite3.connect(project.database) as db:
            row = db.execute("SELECT state FROM task_runs WHERE id = ?", [task_id]).fetchone()
        return bool(row) and row[0] == "STARTED"

    try:
        # a 5 s task is running when the worker is asked to stop: it finishes first
        short = app.tasks["tests.sleep"].apply_async((5, str(folder), "short"), queue="dataset")
        wait_until(lambda: started(short.id), 30, "the 5 s task to start")
        began = time.monotonic()
        assert project.run("stop", "worker", timeout=60).returncode == 0
        assert time.monotonic() - began > 2  # the stop waited for the task
        assert short.get(timeout=10) == "short" and traces(folder) == ["short"]
        assert project.run("start", "worker", timeout=60).returncode == 0
        # a 9 s task outlives the 7 s stop timeout: cold shutdown, and its message goes back
        long = app.tasks["tests.sleep"].apply_async((9, str(folder), "long"), queue="dataset")
        wait_until(lambda: started(long.id), 30, "the 9 s task to start")
        assert project.run("stop", "worker", timeout=60).returncode == 0
        assert traces(folder) == ["short"]  # it did not finish
        status, queues = project.api.get("/v1/queues")
        assert {q["name"]: q["depth"] for q in queues["queues"]}["dataset"] == 1  # back in its queue
        assert project.run("start", "worker", timeout=60).returncode == 0
        assert long.get(timeout=60) == "long"
    finally:
        app.close()
    assert traces(folder) == ["long", "short"]
    with sqlite3.connect(project.database) as db:
        assert db.execute("SELECT attempts FROM task_runs WHERE id = ?", [long.id]).fetchone()[0] == 2


def test_down_leaves_no_process_of_the_tree(project):
    (project.dir / "Procfile").write_text(
        STACK + "worker: dify-local serve worker -P prefork -c 2\n"
        # leaves its process group (setsid): only the subreaper and the tree snapshot catch it
        "escaper: python3 -c \"import subprocess, time; subprocess.Popen(['setsid', 'sleep', '300']); "
        "time.sleep(300)\"\n")
    stack = project.up()
    pids = stack.tree()
    names = {psutil.Process(pid).name() for pid in pids}
    assert "sleep" in names  # the escaped grandchild is part of the tree we watch
    prefork_children = [p for p in psutil.Process(project.processes()["worker"]["pid"]).children()]
    assert len(prefork_children) == 2
    result = project.run("down", timeout=90)
    assert result.returncode == 0 and "stopped in" in result.stdout
    assert stack.wait(30) == 0
    assert stack.alive() == [], [psutil.Process(pid).cmdline() for pid in stack.alive()]
    again = project.run("down")
    assert again.returncode == 0 and "nothing was running" in again.stdout


def test_second_ctrl_c_forces(project, tmp_path):
    env = slow_worker(project, "-c 1")
    stack = project.up(env=env)
    app = client(project, env)
    try:
        app.tasks["tests.sleep"].apply_async((60, str(tmp_path), "long"), queue="dataset")
        wait_until(lambda: "Task tests.sleep[" in stack.output, 30, "the long task to be received")
    finally:
        app.close()
    stack.signal(signal.SIGINT)
    stack.wait_for_line("stopping \\(Ctrl-C again to force\\)", timeout=10)
    began = time.monotonic()
    stack.signal(signal.SIGINT)
    assert stack.wait(30) == 0
    assert time.monotonic() - began < 10  # not the 10 s grace, nor the 60 s task
    assert stack.alive() == []


SIGNAL_WHILE_LOCKED = """
import signal, sys, tempfile, time
from pathlib import Path
from runner.settings import load_settings
from runner.supervisor.manager import Supervisor

supervisor = Supervisor(load_settings(Path(tempfile.mkdtemp())), [], {})
supervisor.start_signal_thread()
with supervisor.events.mutex:  # the main thread inside events.get() when Ctrl-C lands
    supervisor._on_signal(signal.SIGINT, None)
deadline = time.monotonic() + 10
while not supervisor.stopping.is_set() and time.monotonic() < deadline:
    time.sleep(0.01)
sys.exit(0 if supervisor.stopping.is_set() else 3)
"""


def test_a_signal_landing_while_the_main_thread_holds_a_lock_still_stops_the_stack(tmp_path):
    """A signal handler runs in the main thread between two bytecodes, maybe inside Queue.get with
    its lock held: one that takes that lock again waits forever (`up` hung after Ctrl-C under
    load: the one-file binary's bootloader forwards a second SIGINT)."""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_LOCKED], cwd=tmp_path, capture_output=True,
                              text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the signal handler deadlocked on the events queue's lock") from None
    assert done.returncode == 0, done.stderr


def test_processes_stop_themselves_when_up_is_killed_with_sigkill(project):
    """`up` killed with -9 cannot stop anything: each role notices its `up` is gone and stops the
    way `up` would have stopped it, freeing its ports for the next `up`."""
    from tests.helpers import port_open

    stack = project.up()
    rows = json.loads(project.run("ps", "--json").stdout)["processes"]
    pids = {row["name"]: row["pid"] for row in rows}
    assert sorted(pids) == ["api", "beat", "broker", "worker"]
    os.kill(stack.popen.pid, signal.SIGKILL)
    stack.wait(10)

    def gone() -> bool:
        return not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                       for pid in pids.values())
    wait_until(gone, 30, f"the roles {pids} to stop without their up")
    assert not port_open(project.api_port) and not port_open(project.broker_port)
    again = project.up()  # the ports are free: a new up starts
    assert "ready in" in again.output
