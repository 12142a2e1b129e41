"""Controlling a running stack from another terminal: ps, restart/stop/start by name, logs, and clear
messages when nothing runs or a name is unknown."""

from __future__ import annotations

import json
import os
import signal
import stat

from tests.helpers import wait_until


def test_commands_say_clearly_when_nothing_runs(project):
    for args in (("ps",), ("restart", "worker"), ("stop", "api"), ("start", "api"), ("logs", "-f")):
        result = project.run(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert f"nothing is running for {project.state}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert project.run("logs").stderr.startswith("dify-local: no logs yet in")
    down = project.run("down")
    assert down.returncode == 0 and "nothing was running" in down.stdout


def test_ps_restart_stop_start_and_unknown_names(project):
    stack = project.up()
    result = project.run("ps")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "PID", "STATE", "READY", "UPTIME", "RESTARTS", "MEMORY", "LAST", "EXIT"]
    assert [row.split()[0] for row in rows[:4]] == ["broker", "api", "worker", "beat"]
    data = json.loads(project.run("ps", "--json").stdout)
    worker = {row["name"]: row for row in data["processes"]}["worker"]
    assert worker["ready"] and worker["memory"] > 20 * 2**20 and worker["pid"] > 0
    assert data["supervisor"]["pid"] == stack.popen.pid

    unknown = project.run("restart", "wrker")
    assert unknown.returncode == 1
    assert "no process 'wrker'; the processes are: broker, api, worker, beat" in unknown.stderr
    stopped = project.run("stop", "beat")
    assert stopped.returncode == 0 and "beat: stopped" in stopped.stdout
    rows = {row["name"]: row for row in json.loads(project.run("ps", "--json").stdout)["processes"]}
    assert rows["beat"]["status"] == "stopped" and rows["beat"]["pid"] is None
    assert rows["api"]["status"] == "ready"  # the rest keeps running
    started = project.run("start", "beat")
    assert started.returncode == 0 and "beat: ready (pid" in started.stdout
    glob = project.run("restart", "b*")  # broker and beat
    assert glob.returncode == 0 and "restarting broker, beat" in glob.stdout
    assert project.api.status("/health") == 200


def test_control_socket_is_private(project):
    project.up()
    socket_path = project.state / "control.sock"
    mode = stat.S_IMODE(os.stat(socket_path).st_mode)
    assert stat.S_ISSOCK(os.stat(socket_path).st_mode) and mode == 0o600
    assert stat.S_IMODE(os.stat(project.state).st_mode) == 0o700


def test_a_control_request_without_end_is_refused_and_ps_still_answers(project):
    """A request is one line of at most 64 KiB: a client sending 1 MiB with no newline gets one
    error (it was read whole, as long as the client kept sending), then `ps` answers as before."""
    import socket

    project.up("--no-reload")
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(30)
        client.connect(os.fspath(project.state / "control.sock"))
        try:
            client.sendall(b"{" * (1 << 20))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the supervisor answered and closed before all of it was sent
        answer = client.makefile("rb").readline()
    assert json.loads(answer) == {"ok": False, "error": "the request is over 65536 bytes"}
    deep = project_request(project, b"[" * 10_000 + b"\n")  # 10,000 deep: json.loads recursed
    assert json.loads(deep) == {"ok": False, "error": "the request is not JSON"}
    assert project.run("ps").returncode == 0


def project_request(project, raw: bytes) -> bytes:
    import socket

    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(30)
        client.connect(os.fspath(project.state / "control.sock"))
        client.sendall(raw)
        return client.makefile("rb").readline()


def test_logs_from_files_and_following(project):
    stack = project.up()
    for _ in range(3):
        assert project.api.get("/v1/queues")[0] == 200  # the API logs each request
    wait_until(lambda: len(project.run("logs", "-n", "3", "api").stdout.splitlines()) == 3, 10, "three api lines")
    lines = project.run("logs", "-n", "3", "api").stdout.splitlines()
    assert all(" api " in line and "GET /v1/queues 200" in line for line in lines)
    everything = project.run("logs", "-n", "200").stdout
    assert "system" in everything and "worker" in everything and "broker" in everything
    follow = project.start("logs", "-f", "-n", "1", "worker")
    follow.wait_for_line(r"worker +\| ", timeout=30)  # its backlog line: the stream is live
    status, sent = project.api.post("/v1/tasks/rag_pipeline_run_task", {"args": ["followed"]})
    assert status == 202
    follow.wait_for_line(rf"worker +\| .*Task rag_pipeline_run_task\[{sent['id']}\] succeeded", timeout=30)
    assert " api " not in follow.output  # only the process asked for
    unknown = project.run("logs", "nope")
    assert unknown.returncode == 1 and "no logs for nope" in unknown.stderr and "worker" in unknown.stderr
    stack.signal(signal.SIGINT)
    assert stack.wait(60) == 0
    assert follow.wait(20) == 0  # the stream ends with the stack
    after = project.run("logs", "-n", "1", "system")  # the files stay readable afterwards
    assert after.returncode == 0 and after.stdout.rstrip().endswith("stopped")


def test_per_process_log_files_rotate(project):
    (project.dir / "Procfile").write_text(
        "chatty: python3 -c \"import time; [print(f'line {n} ' + 'x' * 500) for n in range(5000)]; time.sleep(300)\"\n")
    project.up(env={"LOG_FILE_MAX_SIZE": "1", "LOG_FILE_BACKUP_COUNT": "2", "LOG_FILE": "all.log"})
    logs = project.state / "logs"
    wait_until(lambda: "line 4999 " in (logs / "chatty.log").read_text(), 60, "all 2.5 MB of output")
    assert (logs / "chatty.log.1").exists() and (logs / "chatty.log.2").exists()
    assert not (logs / "chatty.log.3").exists()  # LOG_FILE_BACKUP_COUNT=2
    assert all((logs / name).stat().st_size <= 1024 * 1024 for name in ("chatty.log", "chatty.log.1"))
    assert "chatty | line 0 " in (project.dir / "all.log.2").read_text()  # LOG_FILE gets every line, rotated too
    tail = project.run("logs", "-n", "1", "chatty").stdout
    assert "line 4999 " in tail


def test_other_terminals_follow_the_flags_up_was_started_with(project):
    """`up --port N --broker-port M` in one terminal; `config`, `queues` and `doctor` in another,
    without those flags or up's environment, look at that stack (and a stale info file of a stopped
    `up` is ignored)."""
    import subprocess

    from tests.helpers import base_env, dify_local

    # the ports from up's flags, the broker's password from its environment only
    stack = project.up("--port", str(project.api_port), "--broker-port", str(project.broker_port),
                       env={"DIFY_PORT": "", "REDIS_PORT": "", "REDIS_PASSWORD": "only-up-knows-this"})
    bare = base_env()  # no port settings at all: the defaults (5001, 6379) unless the stack's flags apply

    def run(*args):
        return subprocess.run([*dify_local(), *args], cwd=project.dir, env=bare, capture_output=True, text=True,
                              timeout=60)

    config = json.loads(run("config", "--json").stdout)
    sources = {item["name"]: (item["value"], item["source"]) for item in config["settings"]}
    assert sources["DIFY_PORT"][0] == str(project.api_port) and "running `up`" in sources["DIFY_PORT"][1]
    assert sources["REDIS_PORT"][0] == str(project.broker_port)
    queues = run("queues")
    assert queues.returncode == 0 and f"127.0.0.1:{project.broker_port}/1" in queues.stdout, queues.stderr
    doctor = run("doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert stat.S_IMODE(os.stat(project.state / "supervisor.json").st_mode) == 0o600  # may hold a password
    # what this terminal sets itself still wins: its flags, its environment
    mine = json.loads(run("--set", "DIFY_PORT=5999", "config", "--json").stdout)
    assert {item["name"]: item["value"] for item in mine["settings"]}["DIFY_PORT"] == "5999"
    bare["DIFY_PORT"] = "5998"
    mine = json.loads(run("config", "--json").stdout)
    assert {item["name"]: item["value"] for item in mine["settings"]}["DIFY_PORT"] == "5998"
    del bare["DIFY_PORT"]

    info = (project.state / "supervisor.json").read_text()
    assert run("down").returncode == 0
    assert stack.wait(60) == 0
    (project.state / "supervisor.json").write_text(info)  # as an `up` killed with -9 leaves it
    after = json.loads(run("config", "--json").stdout)
    assert {item["name"]: item["value"] for item in after["settings"]}["DIFY_PORT"] == "5001"
