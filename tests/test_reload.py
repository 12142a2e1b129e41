"""Hot reload under `up`: a change restarts only the processes that import it, the broker never;
tasks are neither lost nor run twice; broken code keeps the previous process serving.

dify-local's own code is edited in a copy of the `runner` package put first on PYTHONPATH (the
stack then runs, and `up` watches, the copy); a project's own task module sits in the project."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from celery import Celery

from tests.helpers import REPO, free_port, wait_until

PROJECT_TASKS = '''\
import os
import sqlite3
import time

from celery import shared_task

VALUE = 1


@shared_task(name="reload.value")
def value():
    return VALUE


@shared_task(name="reload.record")
def record(number, database, seconds):
    """Record this run in SQLite (the test counts runs per number), after `seconds` of work."""
    time.sleep(seconds)
    connection = sqlite3.connect(database, timeout=60)
    with connection:
        connection.execute("INSERT INTO runs (number, pid, value) VALUES (?, ?, ?)", (number, os.getpid(), VALUE))
    connection.close()
    return number
'''
STACK = ("broker: dify-local serve broker\napi: dify-local serve api\n"
         "worker: dify-local serve worker -I reload_tasks\nbeat: dify-local serve beat\n")
RELOADED = re.compile(r"reloaded (.+?) — (.+)$", re.M)


@pytest.fixture
def stack_source(tmp_path: Path, project):
    """A copy of the runner package, run and watched instead of the installed one; the project's
    Procfile runs the stack with `reload_tasks` in the worker."""
    source = tmp_path / "source"
    shutil.copytree(REPO / "runner", source / "runner", ignore=shutil.ignore_patterns("__pycache__"))
    (project.dir / "Procfile").write_text(STACK)
    (project.dir / "reload_tasks.py").write_text(PROJECT_TASKS)
    return {"PYTHONPATH": f"{source}:{project.dir}", "source": source}


def up(project, source, *args: str):
    env = {"PYTHONPATH": source["PYTHONPATH"]}
    return project.up(*args, env=env)


def client(project) -> Celery:
    app = Celery("reload-test", broker=project.broker_url, backend=project.broker_url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    return app


def value_now(app: Celery) -> int:
    return app.send_task("reload.value", queue="mail").get(timeout=30)


def finished(api, poll: str) -> dict:
    def body():
        status, body = api.get(poll)
        return body if body["state"] in ("SUCCESS", "FAILURE") else None
    return wait_until(body, 60, f"{poll} to finish")


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def reloads(proc) -> list[tuple[str, str]]:
    return RELOADED.findall(proc.output)


def wait_for_reloads(proc, count: int, timeout: float = 60) -> list[tuple[str, str]]:
    try:
        wait_until(lambda: len(reloads(proc)) >= count, timeout, f"{count} reload line(s)")
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- output ---\n{proc.output}") from None
    return reloads(proc)


def test_editing_a_task_module_reloads_only_the_worker(project, stack_source):
    stack = up(project, stack_source)
    api = project.api
    before = project.processes()
    status, sent = api.post("/v1/tasks/send_mail_task", {"args": ["a@example.com", "hello", "first"]})
    assert status == 202
    assert "edited" not in finished(api, sent["poll"])["result"]

    mail = stack_source["source"] / "runner" / "tasks" / "mail.py"
    edit(mail, "    return deliver(context(self), to, subject, body)",
         '    return {"edited": True, **deliver(context(self), to, subject, body)}')
    processes, files = wait_for_reloads(stack, 1)[0]
    assert processes.startswith("worker in ") and files == "runner/tasks/mail.py"

    def edited_result():
        status, sent = api.post("/v1/tasks/send_mail_task", {"args": ["a@example.com", "hello", "again"]})
        assert status == 202
        return finished(api, sent["poll"])["result"].get("edited")
    wait_until(edited_result, 30, "the worker to run the edited task")
    after = project.processes()
    assert after["worker"]["pid"] != before["worker"]["pid"]
    for name in ("broker", "api", "beat"):
        assert after[name]["pid"] == before[name]["pid"], f"{name} was restarted"
    assert after["worker"]["status"] == "ready"


def spares(project) -> dict[str, dict]:
    result = project.run("ps", "--json")
    return {spare["name"]: spare for spare in json.loads(result.stdout)["reload"]["spares"]}


def test_the_second_reload_uses_the_spare(project, stack_source):
    stack = up(project, stack_source)
    app = client(project)
    tasks = project.dir / "reload_tasks.py"
    assert not spares(project)  # none until a process has been reloaded once
    edit(tasks, "VALUE = 1\n", "VALUE = 2\n")
    wait_for_reloads(stack, 1)
    spare = wait_until(lambda: spares(project).get("worker", {}).get("ready") and spares(project)["worker"], 30,
                       "a loaded spare for the worker")
    assert "spares for fast reloads: worker (pid" in project.run("ps").stdout
    edit(tasks, "VALUE = 2\n", "VALUE = 3\n")
    wait_for_reloads(stack, 2)
    # Once the reload is reported, no task runs the old code (the old worker stopped consuming).
    assert [value_now(app) for _ in range(10)] == [3] * 10
    assert project.processes()["worker"]["pid"] == spare["pid"]  # the spare became the worker


def test_editing_an_api_module_reloads_only_the_api_and_refuses_no_request(project, stack_source):
    stack = up(project, stack_source)
    before = project.processes()
    answers: list = []
    done = threading.Event()

    def poll_health() -> None:  # a client polling all along: the reload must never refuse it
        while not done.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{project.api_port}/health", timeout=10) as response:
                    answers.append(json.loads(response.read()).get("edited", False))
            except Exception as error:  # noqa: BLE001 - any failure is what the test looks for
                answers.append(error)
    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        wait_until(lambda: answers, 10, "the first answer")
        status_module = stack_source["source"] / "runner" / "api" / "status.py"
        edit(status_module, 'jsonify({"status": "ok" if ok else "unavailable", "checks": checks})',
             'jsonify({"status": "ok" if ok else "unavailable", "checks": checks, "edited": True})')
        wait_for_reloads(stack, 1)
        wait_until(lambda: answers[-1] is True, 30, "the API to serve the edited code")
    finally:
        done.set()
        poller.join()
    assert reloads(stack)[0][0].startswith("api in ")
    assert reloads(stack)[0][1] == "runner/api/status.py"
    failures = [answer for answer in answers if not isinstance(answer, bool)]
    assert not failures, failures[:3]
    assert answers.index(True) > 0 and all(answers[answers.index(True):])  # old, then only new
    after = project.processes()
    assert after["api"]["pid"] != before["api"]["pid"]
    for name in ("broker", "worker", "beat"):
        assert after[name]["pid"] == before[name]["pid"], f"{name} was restarted"
    assert project.run("stop", "api").returncode == 0  # stopped on purpose: refused, not kept waiting
    from tests.helpers import port_open
    wait_until(lambda: not port_open(project.api_port), 30, "the API's port to close")
    assert project.run("start", "api").returncode == 0
    wait_until(lambda: project.api.get("/health")[0] == 200, 30, "the API to answer again")


def test_settings_change_reloads_every_role_but_the_broker(project, stack_source):
    stack = up(project, stack_source)
    before = project.processes()
    (project.dir / "local_config").mkdir(exist_ok=True)
    (project.dir / "local_config" / "local.env").write_text("QUEUE_MONITOR_THRESHOLD=300\n")
    wait_until(lambda: reloads(stack) and all(name in reloads(stack)[0][0] for name in ("api", "worker", "beat")),
               60, "api, worker and beat to reload")
    after = project.processes()
    assert after["broker"]["pid"] == before["broker"]["pid"]
    for name in ("api", "worker", "beat"):
        assert after[name]["pid"] != before[name]["pid"] and after[name]["status"] == "ready"
    assert len(reloads(stack)) == 1, stack.output


def test_a_syntax_error_keeps_the_old_worker_and_the_fix_reloads(project, stack_source):
    stack = up(project, stack_source)
    app = client(project)
    assert value_now(app) == 1
    worker = project.processes()["worker"]["pid"]
    tasks = project.dir / "reload_tasks.py"
    edit(tasks, "VALUE = 1\n", "VALUE = (2\n")
    line = stack.wait_for_line(r"worker not reloaded: reload_tasks\.py:\d+: SyntaxError.*", timeout=60)
    assert "keeps serving" in line.group(0)
    assert value_now(app) == 1  # the previous worker still answers
    assert project.processes()["worker"]["pid"] == worker
    edit(tasks, "VALUE = (2\n", "VALUE = 3\n")
    wait_for_reloads(stack, 1)
    wait_until(lambda: value_now(app) == 3, 30, "the fixed code to run")
    assert project.processes()["worker"]["pid"] != worker
    assert "crash" not in stack.output and "restarting in" not in stack.output


def test_a_burst_of_300_changed_files_gives_one_reload(project, stack_source):
    package = project.dir / "burst"
    package.mkdir()
    (package / "__init__.py").write_text("")
    names = [f"module_{number:03d}" for number in range(299)]
    for name in names:
        (package / f"{name}.py").write_text("VALUE = 1\n")
    (project.dir / "reload_tasks.py").write_text(
        PROJECT_TASKS + "".join(f"import burst.{name}  # noqa\n" for name in names))
    stack = up(project, stack_source)
    app = client(project)
    assert value_now(app) == 1
    for name in names:  # as a `git checkout` does: hundreds of files rewritten at once
        (package / f"{name}.py").write_text("VALUE = 2\n")
    edit(project.dir / "reload_tasks.py", "VALUE = 1\n", "VALUE = 2\n")
    wait_for_reloads(stack, 1)
    wait_until(lambda: value_now(app) == 2, 30, "the new code to run")
    assert "and 297 more" in reloads(stack)[0][1]
    # Nothing else comes: the watcher would have reported a split burst within its 50 ms step.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert len(reloads(stack)) == 1, stack.output
        time.sleep(0.1)


def runs_database(project) -> Path:
    """The SQLite file where reload.record writes one row per run."""
    database = project.dir / "runs.db"
    with sqlite3.connect(database) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE runs (number INTEGER, pid INTEGER, value INTEGER)")
    return database


def test_every_task_runs_exactly_once_across_20_reloads(project, stack_source):
    stack = up(project, stack_source)
    app = client(project)
    database = runs_database(project)
    total = 2000
    sent: list = []

    def send() -> None:
        for number in range(total):
            sent.append(app.send_task("reload.record", args=[number, str(database), 0.01], queue="mail"))

    sender = threading.Thread(target=send)
    sender.start()
    tasks = project.dir / "reload_tasks.py"
    for edition in range(2, 22):  # 20 reloads while the tasks run
        edit(tasks, f"VALUE = {edition - 1}\n", f"VALUE = {edition}\n")
        wait_for_reloads(stack, edition - 1, timeout=60)
    sender.join()
    for result in sent:
        result.get(timeout=120)
    with sqlite3.connect(database) as connection:
        counts = dict(connection.execute("SELECT number, COUNT(*) FROM runs GROUP BY number"))
        values = {value for (value,) in connection.execute("SELECT DISTINCT value FROM runs")}
    assert len(reloads(stack)) == 20
    assert sorted(counts) == list(range(total)), f"{total - len(counts)} tasks never ran"
    twice = {number: count for number, count in counts.items() if count != 1}
    assert not twice, f"tasks run more than once: {twice}"
    assert len(values) > 1  # the runs did straddle reloads


def test_a_running_task_finishes_when_its_worker_reloads(project, stack_source):
    stack = up(project, stack_source)
    app = client(project)
    database = runs_database(project)
    long = app.send_task("reload.record", args=[1, str(database), 3.0], queue="mail")
    wait_until(lambda: _started(app), 30, "the task to start")
    edit(project.dir / "reload_tasks.py", "VALUE = 1\n", "VALUE = 2\n")
    wait_for_reloads(stack, 1)
    assert long.get(timeout=60) == 1
    with sqlite3.connect(database) as connection:
        rows = list(connection.execute("SELECT number, value FROM runs"))
    assert rows == [(1, 1)]  # ran once, by the old code, to the end


def _started(app) -> bool:
    active = app.control.inspect(timeout=1).active() or {}
    return any(task["name"] == "reload.record" for tasks in active.values() for task in tasks)


def test_no_reload_leaves_the_stack_alone(project, stack_source):
    stack = up(project, stack_source, "--no-reload")
    app = client(project)
    worker = project.processes()["worker"]["pid"]
    edit(project.dir / "reload_tasks.py", "VALUE = 1\n", "VALUE = 2\n")
    deadline = time.monotonic() + 2  # a reload would have come within this (they take a fraction of it)
    while time.monotonic() < deadline:
        assert value_now(app) == 1
    assert project.processes()["worker"]["pid"] == worker
    assert not reloads(stack)


def test_code_broken_at_start_waits_for_a_fix_instead_of_crash_looping(project, stack_source):
    tasks = project.dir / "reload_tasks.py"
    edit(tasks, "VALUE = 1\n", "VALUE = (1\n")
    stack = up(project, stack_source)
    assert re.search(r"worker cannot start: reload_tasks\.py:\d+: SyntaxError", stack.output), stack.output
    assert project.processes()["worker"]["status"] == "failed"
    edit(tasks, "VALUE = (1\n", "VALUE = 4\n")
    wait_for_reloads(stack, 1)
    assert value_now(client(project)) == 4
    row = project.processes()["worker"]
    assert row["status"] == "ready" and row["restarts"] == 1
    assert "restarting in" not in stack.output


PROBE_ENTRY = '''

_schedule_without_probe = build_beat_schedule


def build_beat_schedule(settings):
    """The test's entry on top: every {interval} s, a run recorded in SQLite."""
    schedule = _schedule_without_probe(settings)
    schedule["reload-probe"] = {{"task": "reload.stamp", "schedule": {interval},
                                "args": [{database!r}], "options": {{"queue": "mail"}}}}
    return schedule
'''
STAMP_TASK = '''

@shared_task(name="reload.stamp")
def stamp(database):
    connection = sqlite3.connect(database, timeout=60)
    with connection:
        connection.execute("INSERT INTO stamps (at) VALUES (?)", (time.time(),))
    connection.close()
'''


def test_beat_neither_skips_nor_doubles_an_entry_across_reloads(project, stack_source):
    interval = 2.0
    database = project.dir / "stamps.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE stamps (at REAL)")
    schedule = stack_source["source"] / "runner" / "beat_schedule.py"
    schedule.write_text(schedule.read_text() + PROBE_ENTRY.format(interval=interval, database=str(database)))
    (project.dir / "reload_tasks.py").write_text(PROJECT_TASKS + STAMP_TASK)
    stack = up(project, stack_source)

    def stamps() -> list[float]:
        with sqlite3.connect(database) as connection:
            return [at for (at,) in connection.execute("SELECT at FROM stamps ORDER BY at")]
    wait_until(lambda: len(stamps()) >= 2, 30, "beat to send the probe entry twice")
    for number in range(1, 4):  # the schedule's module changes: beat (and the worker) reload
        schedule.write_text(schedule.read_text() + f"# edit {number}\n")
        wait_for_reloads(stack, number)
        assert "beat" in reloads(stack)[-1][0]
        wanted = len(stamps()) + 2
        wait_until(lambda wanted=wanted: len(stamps()) >= wanted, 30, "two more runs of the entry")
    runs = stamps()
    gaps = [later - earlier for earlier, later in zip(runs, runs[1:], strict=False)]
    # A double is a second run well inside one interval; a skip, a gap of two intervals or more.
    assert min(gaps) > interval / 2, f"an entry ran twice: gaps {gaps}"
    assert max(gaps) < 2 * interval, f"an entry was skipped: gaps {gaps}"


OTHER_WEB = '''
import os
from http.server import BaseHTTPRequestHandler, HTTPServer

VALUE = "one"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(VALUE.encode())

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''


def test_another_projects_process_restarts_on_python_changes_only(project):
    port = free_port()
    (project.dir / "web.py").write_text(OTHER_WEB)
    (project.dir / "Procfile").write_text("web: python web.py\nquiet: python -c 'import time; time.sleep(600)'\n")
    (project.dir / ".env").write_text(f"PORT={port}\n")
    (project.dir / "local_config").mkdir()
    (project.dir / "local_config" / "processes.toml").write_text(
        f'[web]\nready = "tcp://127.0.0.1:{port}"\n[quiet]\nreload = false\n')
    stack = project.up()
    before = project.processes()
    (project.dir / "notes.md").write_text("not code\n")
    edit(project.dir / "web.py", 'VALUE = "one"', 'VALUE = "two"')
    processes, files = wait_for_reloads(stack, 1)[0]
    assert processes.startswith("web in ") and files == "web.py"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        assert response.read() == b"two"
    after = project.processes()
    assert after["web"]["pid"] != before["web"]["pid"]
    assert after["quiet"]["pid"] == before["quiet"]["pid"]  # reload = false
    assert after["broker"]["pid"] == before["broker"]["pid"]
    assert len(reloads(stack)) == 1  # notes.md is not code


def test_what_is_never_watched(tmp_path: Path):
    from runner.reload.watcher import SourceFilter, WatchPlan, watched_folders

    root = tmp_path / "project"
    for folder in ("app", ".venv/lib", "venv2/lib", ".git", "build/lib", "dist", "pkg.egg-info", "data", "state"):
        (root / folder).mkdir(parents=True)
    (root / "venv2" / "pyvenv.cfg").write_text("home = /usr\n")
    plan = WatchPlan((root,), ignore=("data/*", "*.csv"), excluded=(root / "state",))
    keep = SourceFilter(plan)
    assert keep(None, str(root / "app" / "tasks.py")) and keep(None, str(root / "Procfile"))
    for path in ("app/__pycache__/tasks.cpython-311.pyc", ".venv/lib/x.py", "venv2/lib/x.py", ".git/HEAD",
                 "build/lib/x.py", "pkg.egg-info/PKG-INFO", "data/x.py", "app/table.csv", "state/metadata.db",
                 "app/.tasks.py.swp", "app/tasks.py~"):
        assert not keep(None, str(root / path)), path
    # Never walked: .venv, venv2 (a virtualenv by its pyvenv.cfg), .git, build, dist, *.egg-info, state.
    assert sorted(path.relative_to(root).as_posix() for path in watched_folders(plan, keep)) == [".", "app", "data"]



def test_a_save_during_a_reload_is_applied_after_it(project, stack_source):
    stack = up(project, stack_source)
    app = client(project)
    tasks = project.dir / "reload_tasks.py"
    edit(tasks, "VALUE = 1\n", "VALUE = 2\n")
    wait_until(lambda: "reloading" in project.run("ps").stdout or reloads(stack), 30, "the reload to begin")
    edit(tasks, "VALUE = 2\n", "VALUE = 3\n")  # while the first one is under way (or just done)
    wait_until(lambda: value_now(app) == 3, 60, "the second save to be running")
    assert 1 <= len(reloads(stack)) <= 2, stack.output
    assert project.processes()["worker"]["status"] == "ready"
