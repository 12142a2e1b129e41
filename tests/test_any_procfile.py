"""`up` with any project's Procfile: a third-party app with its own Flask and Celery, replicas,
.env read as honcho reads it, and per-process options."""

from __future__ import annotations

import json
import re
import signal
import textwrap

from tests.helpers import Http, free_port

TASKS = '''
import os
from celery import Celery

app = Celery("shop", broker=os.environ["CELERY_BROKER_URL"], backend=os.environ["CELERY_BROKER_URL"])
app.conf.broker_connection_retry_on_startup = True


@app.task
def add(a, b):
    return a + b
'''

WEB = '''
import os
from flask import Flask, jsonify, request
from tasks import add

app = Flask(__name__)


@app.get("/health")
def health():
    return "ok"


@app.get("/add")
def add_view():
    result = add.delay(int(request.args["a"]), int(request.args["b"]))
    return jsonify({"sum": result.get(timeout=30), "redis_url_given": bool(os.environ.get("REDIS_URL"))})


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]))
'''


def test_a_third_party_project_runs_under_up(project):
    web_port = free_port()
    (project.dir / "tasks.py").write_text(TASKS)
    (project.dir / "web.py").write_text(WEB)
    (project.dir / "Procfile").write_text("web: python web.py\n"
                                          "worker: celery -A tasks worker -P threads -c 2 -l INFO\n")
    (project.dir / ".env").write_text(f"PORT={web_port}\n")  # honcho's way of giving web its port
    (project.dir / "local_config").mkdir()
    (project.dir / "local_config" / "processes.toml").write_text(
        f'[web]\nready = "http://127.0.0.1:{web_port}/health"\n')
    stack = project.up()
    assert "broker started" in stack.output  # the embedded broker, for a project that names none
    assert "also web" in [line for line in stack.lines if "ready in" in line][-1]
    status, body = Http(f"http://127.0.0.1:{web_port}").get("/add?a=2&b=3")
    assert status == 200 and body == {"sum": 5, "redis_url_given": True}  # sent by web, run by its worker
    stack.wait_for_line(r"worker +\| .*Task tasks\.add\[.*\] succeeded", timeout=10)
    stack.signal(signal.SIGINT)
    assert stack.wait(60) == 0
    assert stack.alive() == []


def test_scaled_workers_have_names_and_nodes_of_their_own(project):
    stack = project.up("--scale", "worker=2", "-c", "beat=1")
    ready = [line for line in stack.lines if "ready in" in line][-1]
    assert "worker.1 threads×" in ready and "worker.2 threads×" in ready
    rows = {row["name"]: row for row in json.loads(project.run("ps", "--json").stdout)["processes"]}
    assert {"worker.1", "worker.2"} <= set(rows) and rows["worker.1"]["pid"] != rows["worker.2"]["pid"]
    restart = project.run("restart", "worker")  # the process type: every replica
    assert restart.returncode == 0 and "restarting worker.1, worker.2" in restart.stdout
    bad = project.run("up", "--scale", "wrker=2")
    assert bad.returncode == 2 and "no process type 'wrker'" in bad.stderr


def test_dotenv_is_read_and_wins_over_the_environment_as_in_honcho(project):
    (project.dir / ".env").write_text("CELERY_WORKER_AMOUNT=3\n# a comment\nLOG_LEVEL='WARNING'\n")
    config = {row["name"]: row for row in json.loads(
        project.run("config", "--json", env={"CELERY_WORKER_AMOUNT": "5"}).stdout)["settings"]}
    assert (config["CELERY_WORKER_AMOUNT"]["value"], config["CELERY_WORKER_AMOUNT"]["source"]) == ("3", ".env")
    assert config["LOG_LEVEL"]["value"] == "WARNING"
    stack = project.up("worker", "broker")
    assert "worker threads×3" in [line for line in stack.lines if "ready in" in line][-1]
    other = {row["name"]: row for row in json.loads(project.run("-e", "other.env", "config", "--json").stdout)[
        "settings"]}
    assert other["CELERY_WORKER_AMOUNT"]["source"].startswith("default")  # -e names other files


def test_one_off_job_and_log_probe(project):
    (project.dir / "Procfile").write_text(
        "migrate: dify-local migrate\n"
        "web: python3 -u -c \"import time; time.sleep(1); print('Listening on 8000'); time.sleep(300)\"\n")
    (project.dir / "local_config").mkdir()
    (project.dir / "local_config" / "processes.toml").write_text(
        textwrap.dedent("""\
            [migrate]
            restart = "never"

            [web]
            ready = "log:Listening on \\\\d+"
            stop_signal = "SIGINT"
            stop_timeout = 3
            """))
    stack = project.up()
    assert "migrate finished (status 0)" in stack.output
    rows = {row["name"]: row for row in json.loads(project.run("ps", "--json").stdout)["processes"]}
    assert rows["migrate"]["status"] == "finished" and rows["migrate"]["restarts"] == 0
    assert rows["web"]["status"] == "ready"
    stack.signal(signal.SIGINT)
    assert stack.wait(30) == 0
    assert "web stopped (status -2" in stack.output  # stopped with its own signal, SIGINT


def test_bad_process_options_are_named(project):
    (project.dir / "Procfile").write_text("web: python3 -m http.server 0\n")
    (project.dir / "local_config").mkdir()
    (project.dir / "local_config" / "processes.toml").write_text(
        '[web]\nready = "ftp://x"\nstop_signal = "SIGNOPE"\nrestart = "sometimes"\nstop_after = 3\n[api]\n')
    result = project.run("up")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert any("[web] ready='ftp://x' is not allowed" in line for line in lines)
    assert any("[web] stop_signal='SIGNOPE' is not allowed" in line for line in lines)
    assert any("[web] restart='sometimes' is not allowed: one of always, on-failure, never" in line for line in lines)
    assert any("[web] stop_after is not an option" in line for line in lines)
    assert any("[api] names no process of the Procfile" in line for line in lines)
    assert not project.state.exists()


def test_a_process_not_ready_in_time_is_reported_with_its_last_lines(project):
    closed_port = free_port()
    (project.dir / "Procfile").write_text(
        "web: python3 -u -c \"import time; [print(f'booting step {n}') for n in range(30)]; time.sleep(300)\"\n")
    (project.dir / "local_config").mkdir()
    (project.dir / "local_config" / "processes.toml").write_text(
        f'[web]\nready = "tcp://127.0.0.1:{closed_port}"\nready_timeout = 2\n')
    stack = project.start("up")
    stack.wait_for_line(rf"web is not ready after \d+ s; its probe tcp://127.0.0.1:{closed_port} has not passed. "
                        r"Its last lines:", timeout=30)
    stack.wait_for_line(r"system +\|   booting step 29", timeout=10)
    reported = [line for line in stack.lines if re.search(r"system +\|   booting step", line)]  # names pad "system"
    assert len(reported) == 20 and "booting step 10" in reported[0]  # the last 20 lines, in order


def test_replicas_of_other_projects_celery_workers_get_their_own_node_names():
    from runner.supervisor.procfile import describe, expand

    specs = [describe("worker", "celery -A tasks worker -l INFO"), describe("mine", "celery -A t worker -n m@%h")]
    replicas = {spec.name: spec for spec in expand(specs, {"worker": 2, "mine": 2})}
    assert replicas["worker.1"].command == "celery -A tasks worker -l INFO --hostname worker.1@%h"
    assert replicas["mine.2"].command == "celery -A t worker -n m.2@%h"
    assert len({spec.node_name() for spec in replicas.values()}) == 4
    assert replicas["worker.2"].env["PORT"] == "5001" and replicas["mine.1"].env["PORT"] == "5100"
