"""Another project's processes under `up` are ready when they can do their work: a Celery worker
when it answers a ping as its own node, Celery's beat when it has set up its schedule, a web
process when its port answers HTTP. `up`'s ready line and `ps` say so only then.

The project's modules wait at import for a file the test creates (a slow Dify-sized import, made
deterministic), so each test first sees the processes still starting after `up`'s settle time.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.helpers import free_port, wait_until

pytestmark = pytest.mark.processes

GATE = '''
import os, time
while not os.path.exists("go"):  # a slow import (Dify's takes 20 s), until the test says go
    time.sleep(0.05)
'''

TASKS = GATE + '''
from celery import Celery

app = Celery("slowshop", broker=os.environ["CELERY_BROKER_URL"])
app.conf.broker_connection_retry_on_startup = True
app.conf.beat_schedule = {"every-minute": {"task": "tasks.add", "schedule": 60.0, "args": (1, 2)}}


@app.task
def add(a, b):
    return a + b
'''

WEB = GATE + '''
from flask import Flask

app = Flask(__name__)


@app.get("/")
def index():
    return "shop"
'''

SETTLE_SECONDS = 1.5  # runner.supervisor.probes: what an unknown process is given


def ps(project) -> dict[str, dict] | None:
    done = project.run("ps", "--json")
    if done.returncode != 0:
        return None  # `up` has not opened its control socket yet
    return {row["name"]: row for row in json.loads(done.stdout)["processes"]}


def line_index(lines: list[str], pattern: str) -> int:
    regex = re.compile(pattern)
    return next(index for index, line in enumerate(lines) if regex.search(line))


def test_web_worker_and_beat_of_another_project_are_ready_only_when_they_serve(project):
    (project.dir / "tasks.py").write_text(TASKS)
    (project.dir / "web.py").write_text(WEB)
    (project.dir / "Procfile").write_text("web: flask --app web run --port $PORT\n"
                                          "worker: celery -A tasks worker -P threads -c 2 -l INFO\n"
                                          "beat: celery -A tasks beat\n")
    (project.dir / ".env").write_text(f"PORT={free_port()}\n")
    stack = project.start("up", "--no-reload")
    names = ("web", "worker", "beat")

    def all_past_settling():
        rows = ps(project)
        return rows if rows and all((rows[name]["uptime"] or 0) > SETTLE_SECONDS + 1 for name in names) else None

    rows = wait_until(all_past_settling, 60, "the project's processes to run past the settle time")
    # their imports have not finished: none of them can work yet, and `ps` must not say otherwise
    assert {name: rows[name]["status"] for name in names} == dict.fromkeys(names, "starting")
    assert "ready in" not in stack.output
    (project.dir / "go").write_text("")

    logs = project.state / "logs"
    marks = {"worker": r"celery@\S+ ready\.", "web": r"Running on http://", "beat": r"LocalTime -> "}
    ready_seen: set[str] = set()

    def each_ready_row_has_its_mark():
        rows = ps(project) or {}
        for name in names:
            if rows.get(name, {}).get("status") == "ready" and name not in ready_seen:
                # up writes a process's lines to its log before it answers a later `ps`
                log = (logs / f"{name}.log").read_text()
                assert re.search(marks[name], log), f"ps says {name} is ready before it could work:\n{log}"
                ready_seen.add(name)
        return ready_seen == set(names)

    wait_until(each_ready_row_has_its_mark, 60, "ps to show the three ready")
    stack.wait_for_line(r"ready in [\d.]+ s", timeout=30)
    lines = stack.lines
    ready = line_index(lines, r"system +\| ready in")
    assert line_index(lines, r"worker +\| .*celery@\S+ ready\.") < line_index(lines, r"system +\| worker ready") < ready
    assert line_index(lines, r"web +\| .*Running on http://") < line_index(lines, r"system +\| web ready") < ready
    assert line_index(lines, r"beat +\| LocalTime -> ") < line_index(lines, r"system +\| beat ready") < ready
    ready_line = lines[ready]
    # what this app's worker consumes (Celery's default queue), not our 16; its beat, not ours
    assert "1 queue ·" in ready_line and "beat (beat)" in ready_line and "periodic tasks" not in ready_line


def test_a_worker_is_ready_as_itself_not_as_another_node_of_its_name(project):
    """Another worker answering as celery@<host> on the same broker does not make ours ready."""
    (project.dir / "tasks.py").write_text(TASKS)
    (project.dir / "other.py").write_text(TASKS.replace(GATE, "import os\n"))
    (project.dir / "Procfile").write_text("worker: celery -A tasks worker -P threads -c 1 -l INFO\n")
    stack = project.start("up", "--no-reload")
    stack.wait_for_line(r"system +\| broker ready", timeout=60)
    other = project.start(argv=[sys.executable, "-m", "celery", "-A", "other", "worker", "-P", "threads", "-c", "1",
                                "-l", "INFO", "--without-mingle", "--without-gossip"],
                          env={"CELERY_BROKER_URL": project.broker_url})
    other.wait_for_line(r"celery@\S+ ready\.", timeout=60)
    node = re.search(r"(celery@\S+) ready\.", other.output).group(1)
    answered = project.run("inspect", "ping", "-d", node)
    assert answered.returncode == 0, answered.stdout + answered.stderr  # the other one answers as that node
    assert ps(project)["worker"]["status"] == "starting"
    (project.dir / "go").write_text("")
    stack.wait_for_line(r"ready in [\d.]+ s", timeout=60)
    lines = stack.lines
    assert line_index(lines, r"worker +\| .*celery@\S+ ready\.") < line_index(lines, r"system +\| worker ready")
    assert ps(project)["worker"]["status"] == "ready"


FAKE_UV = '''#!{python}
"""`uv run COMMAND`, as uv runs it: COMMAND as a child process, signals passed on."""
import signal, subprocess, sys
assert sys.argv[1] == "run"
child = subprocess.Popen(sys.argv[2:])
for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
    signal.signal(signum, lambda number, frame: child.send_signal(number))
sys.exit(child.wait())
'''


def test_lines_run_through_uv_are_judged_the_same(project, tmp_path):
    """Dify's own Procfile lines (`uv run celery …`): the worker answers from uv's child process."""
    from runner.supervisor.procfile import describe

    if describe("worker", "uv run celery -A tasks worker").role != "worker":
        pytest.skip("Procfile lines through uv are not recognised as Celery's yet (procfile.describe)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "uv").write_text(FAKE_UV.format(python=sys.executable))
    (bin_dir / "uv").chmod(0o755)
    (project.dir / "tasks.py").write_text(TASKS)
    (project.dir / "web.py").write_text(WEB)
    (project.dir / "Procfile").write_text("web: uv run flask --app web run --port $PORT\n"
                                          "worker: uv run celery -A tasks worker -P threads -c 2 -l INFO\n"
                                          "beat: uv run celery -A tasks beat\n")
    (project.dir / ".env").write_text(f"PORT={free_port()}\n")
    path = f"{bin_dir}:{project.env['PATH']}"
    stack = project.start("up", "--no-reload", env={"PATH": path})
    names = ("web", "worker", "beat")

    def all_past_settling():
        rows = ps(project)
        return rows if rows and all((rows[name]["uptime"] or 0) > SETTLE_SECONDS + 1 for name in names) else None

    rows = wait_until(all_past_settling, 60, "the project's processes to run past the settle time")
    assert {name: rows[name]["status"] for name in names} == dict.fromkeys(names, "starting")
    (project.dir / "go").write_text("")
    stack.wait_for_line(r"ready in [\d.]+ s", timeout=60)
    lines = stack.lines
    ready = line_index(lines, r"system +\| ready in")
    assert line_index(lines, r"worker +\| .*celery@\S+ ready\.") < line_index(lines, r"system +\| worker ready") < ready
    assert line_index(lines, r"web +\| .*Running on http://") < line_index(lines, r"system +\| web ready") < ready
    assert line_index(lines, r"beat +\| LocalTime -> ") < line_index(lines, r"system +\| beat ready") < ready
