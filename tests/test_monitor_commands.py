"""`dify-local inspect`, `queues` and `purge` against real processes: a stack whose worker runs a
task the test holds, a stack without a worker, and queues filled with messages of several
priorities on the embedded broker and on a real redis-server."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import termios
import threading
import time

import pytest
import redis

from runner.celery_app import create_celery_app
from runner.monitor.queues import QueueDepth
from runner.settings import load_settings
from runner.store.database import Database
from runner.store.queue_samples import record_samples
from runner.topology import QUEUE_NAMES
from tests.helpers import REPO, dify_local, wait_until

BROKER = "broker: dify-local serve broker\n"
# one slot and a prefetch of two: one task runs, the next one waits reserved in the worker
WORKER = "worker: dify-local serve worker -I tests.support.blocking_tasks -c 1 --prefetch-multiplier 2\n"
SECRETS = ("difyai123456", "realredispw")


def secrets_of(project) -> tuple[str, ...]:
    """Passwords no output may show: the test Redis', and this project's broker's once it has one."""
    return (*SECRETS, project.broker_password) if (project.state / "broker-password").exists() else SECRETS


def run(project, *args: str, env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """`dify-local ARGS` in the project, with `input` on its stdin (none: stdin closed)."""
    done = subprocess.run([*dify_local(), *args], cwd=project.dir, env={**project.env, **(env or {})},
                          input=input or "", capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert not any(secret in done.stdout + done.stderr for secret in secrets_of(project))
    return done


def as_json(project, *args: str, env: dict | None = None) -> dict:
    done = run(project, *args, "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def queues(project, env: dict | None = None) -> dict[str, dict]:
    report = as_json(project, "queues", "--timeout", "0.5", env=env)
    return {row["name"]: row for row in report["queues"]}


def row_of(text: str, first: str) -> list[str]:
    return next(line.split() for line in text.splitlines() if line.split()[:1] == [first])


def line_with(text: str, needle: str) -> str:
    return next(line for line in text.splitlines() if needle in line)


def queue_line(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.split()[:1] == [name])


def one_line_error(done: subprocess.CompletedProcess, status: int = 1) -> str:
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dify-local: "), done.stderr
    return lines[0]


def client(project, env: dict | None = None):
    """A sender with the stack's settings (its messages carry the sent_at header)."""
    return create_celery_app(load_settings(project.dir, environ={**project.env, **(env or {})}),
                             register_tasks=False)


@pytest.fixture(params=["embedded", "redis-server"])
def broker_env(request, project) -> dict[str, str]:
    """No stack, no worker: only a broker, the embedded one or a real redis-server."""
    if request.param == "embedded":
        project.serve_broker()
        return {}
    return {"CELERY_BROKER_URL": request.getfixturevalue("redis_server") + "/1"}


# -- inspect ------------------------------------------------------------------------------------------

def test_inspect_shows_what_the_worker_runs_holds_and_knows(project):
    (project.dir / "Procfile").write_text(BROKER + WORKER)
    project.up(env={"PYTHONPATH": str(REPO)})  # the worker imports tests.support from this checkout
    node, = as_json(project, "inspect", "ping")
    app = client(project)
    release = project.dir / "release"

    def listed(method: str, task_id: str) -> bool:
        entries = as_json(project, "inspect", method, "-d", node, "--timeout", "10")[node]
        return any((entry.get("request") or entry)["id"] == task_id for entry in entries)

    # one at a time, so each is where the test says: held for its countdown, running, reserved
    later = app.send_task("tests.block", kwargs={"label": "later", "release": str(release)}, queue="mail",
                          countdown=600)
    wait_until(lambda: listed("scheduled", later.id), 60, "the countdown task to be held")
    running = app.send_task("tests.block", kwargs={"label": "running", "release": str(release)}, queue="mail")
    wait_until(lambda: listed("active", running.id), 60, "the first task to run")
    waiting = app.send_task("tests.block", kwargs={"label": "waiting", "release": str(release)}, queue="ops_trace")
    wait_until(lambda: listed("reserved", waiting.id), 60, "the second task to be reserved")

    active = run(project, "inspect", "active")
    assert active.returncode == 0, active.stderr
    assert active.stdout.splitlines()[0].split() == ["WORKER", "TASK", "ID", "QUEUE", "STARTED", "RUNNING", "ARGS"]
    line = line_with(active.stdout, running.id)
    assert line.split()[:4] == [node, "tests.block", running.id, "mail"]
    assert re.search(r"mail\s+\d\d:\d\d:\d\d\s+\d+ (s|min)\s+label=\"running\", release=\"", line), line
    reply = as_json(project, "inspect", "active")[node]
    assert [(task["id"], task["kwargs"]["label"]) for task in reply] == [(running.id, "running")]
    assert reply[0]["time_start"] <= time.time()

    scheduled = run(project, "inspect", "scheduled")
    line = line_with(scheduled.stdout, later.id)
    assert line.split()[:4] == [node, "tests.block", later.id, "mail"]
    assert re.search(r"mail\s+\d\d:\d\d:\d\d\s+in (9|10) min\s+label=\"later\"", line), line
    entry, = as_json(project, "inspect", "scheduled")[node]
    assert entry["request"]["id"] == later.id and entry["eta"]

    reserved = run(project, "inspect", "reserved")
    assert reserved.stdout.splitlines()[0].split() == ["WORKER", "TASK", "ID", "QUEUE", "ARGS"]
    assert line_with(reserved.stdout, waiting.id).split()[:5] == [node, "tests.block", waiting.id, "ops_trace",
                                                                  'label="waiting",']

    registered = run(project, "inspect", "registered").stdout
    assert re.search(r"^\s+send_mail_task\s+mail$", registered, re.M)
    assert re.search(r"^\s+tests\.block\s+\(its sender's choice\)$", registered, re.M)
    assert "tests.block" in as_json(project, "inspect", "registered")[node]

    stats = as_json(project, "inspect", "stats")[node]
    worker_pid = {row["name"]: row for row in as_json(project, "ps")["processes"]}["worker"]["pid"]
    assert stats["pid"] == worker_pid and stats["pool"]["max-concurrency"] == 1
    text = run(project, "inspect", "stats").stdout
    assert text.splitlines()[0].split() == ["WORKER", "PID", "UPTIME", "POOL", "CONCURRENCY", "PREFETCH",
                                            "ACCEPTED", "BROKER"]
    assert re.search(rf"^{re.escape(node)}\s+{worker_pid}\s+\d+ (s|min)\s+threads\s+1\s+\d+\s+\d+\s+"
                     rf"redis://127\.0\.0\.1:{project.broker_port}/1$", text, re.M), text

    assert row_of(run(project, "inspect", "ping").stdout, node) == [node, "pong"]
    assert as_json(project, "inspect", "ping") == {node: {"ok": "pong"}}
    assert row_of(run(project, "inspect", "active_queues").stdout, node) == [node, "priority_dataset", "high"]

    # -d: only that worker; a name nobody answers to is an error naming it
    assert run(project, "inspect", "ping", "-d", node).returncode == 0
    ghost = one_line_error(run(project, "inspect", "ping", "-d", "ghost@nowhere", "--timeout", "0.5"))
    assert "no worker named ghost@nowhere answered `inspect ping` within 0.5 s" in ghost
    partly = run(project, "inspect", "ping", "-d", node, "-d", "ghost@nowhere", "--timeout", "0.5")
    assert row_of(partly.stdout, node) == [node, "pong"]
    assert "no answer from ghost@nowhere within 0.5 s" in one_line_error(partly)

    # `queues` names the worker as every queue's consumer
    report = as_json(project, "queues")
    assert report["workers"] == [node]
    assert all(row["consumers"] == [node] for row in report["queues"])
    assert [row["name"] for row in report["queues"]] == list(QUEUE_NAMES)
    assert row_of(run(project, "queues").stdout, "mail")[:4] == ["mail", "normal", "0", node]

    release.write_text("go")
    wait_until(lambda: as_json(project, "inspect", "active", "-d", node, "--timeout", "10")[node] == []
               and as_json(project, "inspect", "reserved", "-d", node, "--timeout", "10")[node] == [],
               60, "both tasks to finish")
    idle = run(project, "inspect", "active")
    assert idle.returncode == 0 and idle.stdout.strip() == f"no task is running (1 worker answered: {node})"


def test_without_a_worker_inspect_says_who_was_asked_where_and_fails(project):
    project.up("broker", "api")  # the built-in Procfile, without its worker and beat
    url = f"redis://:****@127.0.0.1:{project.broker_port}/1 (embedded)"
    for method in ("active", "ping", "stats"):
        done = run(project, "inspect", method, "--timeout", "0.5")
        assert done.stdout == ""
        line = one_line_error(done)
        assert f"no worker answered `inspect {method}` within 0.5 s through the broker {url}" in line
        assert "dify-local ps" in line and "--timeout" in line
    quiet = run(project, "inspect", "ping", "--json", "--timeout", "0.5")
    assert json.loads(quiet.stdout) == {} and quiet.returncode == 1

    text = run(project, "queues", "--timeout", "0.5")
    assert text.returncode == 0, text.stderr
    for name in QUEUE_NAMES:
        assert row_of(text.stdout, name)[3] == "NOBODY"
    assert "consumers: no worker answered within 0.5 s (is the stack up with a worker? `dify-local ps`)" \
        in text.stdout


def test_a_broker_that_is_not_there_is_one_line_for_every_command(project):
    url = f"redis://:****@127.0.0.1:{project.broker_port}/1"
    for args in (("inspect", "ping"), ("queues",), ("queues", "--json"), ("purge", "mail", "--yes")):
        line = one_line_error(run(project, *args))
        assert line.startswith(f"dify-local: cannot use the embedded broker at {url}: "), line
        assert "dify-local up" in line


# -- queues -------------------------------------------------------------------------------------------

def test_queues_sums_the_priority_sublists_and_ages_the_oldest(project, broker_env):
    settings = load_settings(project.dir, environ={**project.env, **broker_env})
    app = client(project, broker_env)
    for priority in [*range(10), None]:
        app.send_task("document_indexing_task", args=["kb-1", f"{priority}.txt", "text"], queue="dataset",
                      priority=priority)
    app.send_task("someone.elses_task", queue="their_queue")
    raw = redis.Redis.from_url(settings.broker_url)
    sublists = [key for key in raw.scan_iter(match="dataset*") if raw.type(key) == b"list"]
    assert len(sublists) >= 3 and sum(raw.llen(key) for key in sublists) == 11  # kombu's steps, really used
    raw.close()

    first = queues(project, broker_env)
    dataset = first["dataset"]
    assert (dataset["priority"], dataset["depth"], dataset["consumers"]) == ("normal", 11, [])
    assert dataset["oldest_age"] >= 0 and dataset["oldest_sent_at"] <= time.time()
    assert first["their_queue"]["priority"] is None and first["their_queue"]["depth"] == 1
    assert list(first) == [*QUEUE_NAMES, "their_queue"]
    assert all(first[name]["depth"] == 0 and first[name]["oldest_age"] is None
               for name in QUEUE_NAMES if name != "dataset")
    wait_until(lambda: queues(project, broker_env)["dataset"]["oldest_age"] > dataset["oldest_age"], 30,
               "the oldest message's age to grow")

    text = run(project, "queues", "--timeout", "0.5", env=broker_env)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0].split() == ["QUEUE", "PRIORITY", "DEPTH", "CONSUMERS", "OLDEST", "TREND",
                                                   "(5", "min)"]
    assert re.fullmatch(r"dataset\s+normal\s+11\s+NOBODY\s+\d+ (s|min)\s+-", queue_line(text.stdout, "dataset"))
    assert row_of(text.stdout, "mail") == ["mail", "normal", "0", "NOBODY", "-", "-"]
    assert row_of(text.stdout, "their_queue")[:4] == ["their_queue", "-", "1", "NOBODY"]
    kind = "embedded" if not broker_env else "external"
    assert re.search(rf"^12 waiting in all · broker redis://:\*\*\*\*@127\.0\.0\.1:\d+/1 \({kind}\)$",
                     text.stdout, re.M)


def test_queues_shows_the_trend_of_the_samples_beat_keeps(project):
    project.serve_broker()
    assert project.run("migrate").returncode == 0
    now = time.time()
    database = Database(project.database)
    for age, depth in ((400, 50), (240, 0), (180, 2), (120, 4), (60, 8)):  # the first is outside the window
        record_samples(database, [QueueDepth("dataset", depth, None), QueueDepth("mail", 3, None)], at=now - age)
    app = client(project)
    for _ in range(10):
        app.send_task("document_indexing_task", args=["kb-1", "a.txt", "text"], queue="dataset")

    report = queues(project)
    trend = report["dataset"]["trend"]
    assert (trend["samples"], trend["change"], trend["window_seconds"]) == (4, 10, 300)
    assert trend["depths"] == sorted(trend["depths"]) and trend["depths"][-1] == 10
    assert report["mail"]["trend"]["change"] == -3
    assert report["retention"]["trend"] is None

    text = run(project, "queues", "--timeout", "0.5").stdout
    assert re.search(r"[▁▂▃▄▅▆▇█]+ \+10$", queue_line(text, "dataset")), text
    assert re.search(r"[▁▂▃▄▅▆▇█]+ -3$", queue_line(text, "mail")), text
    assert queue_line(text, "retention").endswith(" -")


def test_watch_prints_a_block_per_interval_keeps_going_without_a_broker_and_stops_on_ctrl_c(project):
    watch = project.start("queues", "--watch", "--interval", "0.2", "--timeout", "0.2")
    watch.wait_for_line(r"dify-local: cannot use the embedded broker at redis://:\*\*\*\*@", 60)
    project.serve_broker()
    watch.wait_for_line(r"(?s)QUEUE\s+PRIORITY.*QUEUE\s+PRIORITY", 60)  # two frames since the broker came
    watch.signal(signal.SIGINT)
    assert watch.wait(30) == 0
    assert "Traceback" not in watch.output and "Aborted" not in watch.output
    assert "\x1b[" not in watch.output  # no cursor movement when stdout is not a terminal
    assert re.search(r"^every 0\.2 s · \d\d:\d\d:\d\d · redis://:\*\*\*\*@127\.0\.0\.1:\d+/1 \(embedded\) · "
                     r"Ctrl-C stops$", watch.output, re.M)


def test_watch_on_a_terminal_redraws_from_the_top_within_the_window(project):
    project.serve_broker()
    leader, follower = pty.openpty()
    rows, columns = 12, 60  # smaller than a frame: it must be cut, never scroll
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    proc = subprocess.Popen([*dify_local(), "queues", "--watch", "--interval", "0.2", "--timeout", "0.2"],
                            cwd=project.dir, env=project.env, stdin=follower, stdout=follower, stderr=follower,
                            start_new_session=True)
    os.close(follower)
    seen = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal's other side closed
                return
            if not chunk:
                return
            seen.extend(chunk)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: bytes(seen).count(b"\x1b[H") >= 3, 60, "three frames on the terminal")
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(leader)
    text = seen.decode("utf-8", "replace")
    assert "Traceback" not in text
    assert text.count("\x1b[2J") == 1 and text.endswith("\x1b[?25h")  # cleared once; the cursor given back
    for frame in text.split("\x1b[H")[1:-1]:  # whole frames (the last one may be cut by Ctrl-C)
        lines = frame.split("\x1b[J")[0].rstrip("\r\n").split("\r\n")
        assert len(lines) <= rows - 1, lines
        assert all(len(line.replace("\x1b[K", "")) <= columns for line in lines), lines
        assert lines[0].startswith("every 0.2 s · ") and lines[2].startswith("QUEUE")


# -- purge --------------------------------------------------------------------------------------------

def test_purge_asks_first_and_empties_every_priority_sublist(project, broker_env):
    app = client(project, broker_env)
    for priority in (0, 5, 9, None, None):
        app.send_task("send_mail_task", args=["dev@example.com", "hi", "text"], queue="mail", priority=priority)

    declined = run(project, "purge", "mail", env=broker_env, input="n\n")
    assert declined.returncode == 0, declined.stderr
    assert declined.stdout.startswith("mail: 5 messages waiting\nDelete them? [y/N]: ")
    assert declined.stdout.rstrip().endswith("nothing removed")
    unanswered = run(project, "purge", "mail", env=broker_env)  # stdin closed: no answer is no
    assert "no answer: nothing removed (--yes purges without asking)" in one_line_error(unanswered)
    assert queues(project, broker_env)["mail"]["depth"] == 5

    agreed = run(project, "purge", "mail", env=broker_env, input="y\n")
    assert agreed.returncode == 0, agreed.stderr
    assert agreed.stdout.rstrip().endswith("removed 5 messages from mail")
    assert queues(project, broker_env)["mail"]["depth"] == 0
    empty = run(project, "purge", "mail", "--yes", env=broker_env)
    assert empty.returncode == 0 and empty.stdout == "the queue mail is empty: nothing to purge\n"

    for queue in ("dataset", "retention", "retention"):
        app.send_task("clean_task_runs_task", queue=queue, priority=9)
    every = run(project, "purge", "--all", "--yes", env=broker_env)
    assert every.returncode == 0, every.stderr
    assert every.stdout.splitlines() == ["dataset: 1 message waiting", "retention: 2 messages waiting",
                                         "removed 1 message from dataset", "removed 2 messages from retention"]
    assert all(row["depth"] == 0 for row in queues(project, broker_env).values())
    assert run(project, "purge", "--all", env=broker_env).stdout == "all 16 queues are empty: nothing to purge\n"
    assert run(project, "purge", "mail", "dataset", env=broker_env).stdout == \
        "the queues mail, dataset are empty: nothing to purge\n"

    unknown = one_line_error(run(project, "purge", "mails", "--yes", env=broker_env), status=2)
    assert "no queue 'mails' on redis://:****@127.0.0.1:" in unknown
    assert "the queues are: priority_dataset, priority_pipeline, dataset, pipeline, mail," in unknown


# -- bad input ----------------------------------------------------------------------------------------

def test_bad_input_names_the_thing_and_what_is_allowed(project):
    method = run(project, "inspect", "actve")
    assert method.returncode == 2
    assert ("'actve' is not one of 'active', 'scheduled', 'reserved', 'registered', 'stats', 'ping'"
            in method.stderr)
    for value in ("abc", "0", "-1", "nan", "inf", "601"):
        done = run(project, "inspect", "ping", "--timeout", value)
        assert done.returncode == 2 and f"Invalid value for '--timeout': '{value}'" in done.stderr, done.stderr
    interval = run(project, "queues", "--watch", "--interval", "0")
    assert interval.returncode == 2 and "'--interval': '0' is not allowed: more than 0" in interval.stderr
    for args in (("purge",), ("purge", "mail", "--all")):
        line = one_line_error(run(project, *args), status=2)
        assert "name the queues to purge, or --all (not both); the queues are: priority_dataset," in line
