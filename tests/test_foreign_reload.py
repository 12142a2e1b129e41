"""Another project's Celery app under `up`: its worker, beat and Flask API are run through our bootstrap
(runner/reload/bootstrap.py) in their own interpreter, so a save of a task module reloads only the
worker, by takeover from a spare kept warm from the start; nothing sent meanwhile is lost, and broken
code keeps the old worker serving with file and line shown."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from pathlib import Path

import pytest
from celery import Celery

from runner import process_env
from runner.reload import bootstrap, foreign
from runner.supervisor.procfile import describe
from tests.helpers import free_port, wait_until

pytestmark = pytest.mark.processes

APP = '''\
import os

from celery import Celery

app = Celery("shop", broker=os.environ["CELERY_BROKER_URL"], backend=os.environ["CELERY_BROKER_URL"],
             include=["shop_tasks"])
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                broker_connection_retry_on_startup=True,
                beat_schedule={"heartbeat": {"task": "shop.heartbeat", "schedule": 2.0}})
celery = app  # as Dify's app.celery
'''
TASKS = '''\
import os
import sqlite3

from app import app

VALUE = 1


@app.task(name="shop.value")
def value():
    return VALUE


@app.task(name="shop.heartbeat")
def heartbeat():
    return "beat"


@app.task(name="shop.record")
def record(number, database):
    connection = sqlite3.connect(database, timeout=60)
    with connection:
        connection.execute("INSERT INTO runs (number, value) VALUES (?, ?)", (number, VALUE))
    connection.close()
    return number
'''
WEB = '''\
from flask import Flask

from app import app as celery_app

web = Flask(__name__)


@web.get("/")
def index():
    return {"sent": celery_app.send_task("shop.value").id}
'''
RELOADED = re.compile(r"reloaded (.+?) — (.+)$", re.M)


@pytest.fixture
def shop(project, tmp_path: Path):
    """A foreign project: Celery app `app.celery`, tasks in shop_tasks.py, a Flask API that only sends."""
    (project.dir / "app.py").write_text(APP)
    (project.dir / "shop_tasks.py").write_text(TASKS)
    (project.dir / "web.py").write_text(WEB)
    (project.dir / "Procfile").write_text(
        "api: flask --app web run --port {port}\n"
        "worker: celery -A app.celery worker -P threads -c 2 --without-mingle --without-gossip -l INFO\n"
        f"beat: celery -A app.celery beat -l INFO -s {tmp_path / 'beat-schedule'}\n".format(port=free_port()))
    return project


def client(project) -> Celery:
    app = Celery("shop-client", broker=project.broker_url, backend=project.broker_url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])
    return app


def value_now(app: Celery) -> int:
    return app.send_task("shop.value", queue="celery").get(timeout=30)


def reloads(proc) -> list[tuple[str, str]]:
    return RELOADED.findall(proc.output)


def wait_output(proc, pattern: str, timeout: float = 60) -> re.Match:
    try:
        return wait_until(lambda: re.search(pattern, proc.output, re.M), timeout, f"`up` to print {pattern!r}")
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- output ---\n{proc.output}") from None


def spare_of(project, name: str) -> dict | None:
    done = project.run("ps", "--json")
    spares = {row["name"]: row for row in json.loads(done.stdout)["reload"]["spares"]}
    row = spares.get(name)
    return row if row and row["ready"] else None


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def test_a_task_module_save_reloads_only_the_worker_from_its_spare_and_loses_nothing(shop, tmp_path):
    stack = shop.up()
    app = client(shop)
    assert value_now(app) == 1
    # kept warm from the start: the first save is fast too (ps shows it, with its memory)
    spare = wait_until(lambda: spare_of(shop, "worker"), 60, "a loaded spare for the worker")
    assert "spares for fast reloads: worker (pid" in shop.run("ps").stdout
    before = shop.processes()

    database = tmp_path / "runs.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE runs (number INTEGER, value INTEGER)")
    sent, stop = [], threading.Event()

    def send_all_along() -> None:  # tasks sent before, during and after the reload
        while not stop.is_set() and len(sent) < 400:
            sent.append(app.send_task("shop.record", args=[len(sent), str(database)], queue="celery"))
            stop.wait(0.01)
    sender = threading.Thread(target=send_all_along)
    sender.start()
    try:
        wait_until(lambda: len(sent) >= 20, 30, "tasks sent before the save")
        edit(shop.dir / "shop_tasks.py", "VALUE = 1\n", "VALUE = 2\n")
        processes, files = wait_output(stack, r"reloaded (.+?) — (.+)$").groups()
        assert processes.startswith("worker in ") and files == "shop_tasks.py", stack.output
        wait_until(lambda: value_now(app) == 2, 30, "the new code to run")
        count = len(sent)
        wait_until(lambda: len(sent) >= count + 20, 30, "tasks sent after the reload")
    finally:
        stop.set()
        sender.join()
    numbers = [result.get(timeout=60) for result in sent]  # every one ran …
    assert numbers == list(range(len(sent)))
    with sqlite3.connect(database) as connection:
        runs = connection.execute("SELECT number, COUNT(*) FROM runs GROUP BY number").fetchall()
        values = {value for (value,) in connection.execute("SELECT DISTINCT value FROM runs")}
    assert len(runs) == len(sent) and all(times == 1 for _, times in runs)  # … once
    assert values == {1, 2}

    after = shop.processes()
    assert after["worker"]["pid"] == spare["pid"] != before["worker"]["pid"]  # the spare took over
    for name in ("broker", "api", "beat"):
        assert after[name]["pid"] == before[name]["pid"], f"{name} was restarted"
    assert reloads(stack)[1:] == [], stack.output  # one reload, of the worker alone


def test_broken_task_module_keeps_the_old_worker_and_names_file_and_line(shop):
    stack = shop.up()
    app = client(shop)
    wait_until(lambda: spare_of(shop, "worker"), 60, "a loaded spare for the worker")
    before = shop.processes()
    edit(shop.dir / "shop_tasks.py", "VALUE = 1\n", "VALUE = (1\n")
    failure = wait_output(stack, r"worker not reloaded: (.+)$").group(1)
    assert failure.startswith("shop_tasks.py:6: SyntaxError") and "keeps serving" in failure, failure
    assert value_now(app) == 1
    assert shop.processes()["worker"]["pid"] == before["worker"]["pid"]
    edit(shop.dir / "shop_tasks.py", "VALUE = (1\n", "VALUE = 3\n")
    wait_output(stack, r"reloaded worker in [\d.]+ s — shop_tasks.py$")
    wait_until(lambda: value_now(app) == 3, 30, "the fixed code to run")
    after = shop.processes()
    assert after["worker"]["pid"] != before["worker"]["pid"]
    for name in ("api", "beat"):
        assert after[name]["pid"] == before[name]["pid"], f"{name} was restarted"


def test_a_worker_broken_at_start_waits_for_the_fix(shop):
    edit(shop.dir / "shop_tasks.py", "VALUE = 1\n", "VALUE = 1 +\n")
    stack = shop.up()
    assert re.search(r"worker cannot start: shop_tasks.py:6: SyntaxError", stack.output), stack.output
    assert shop.processes()["worker"]["status"] == "failed"
    edit(shop.dir / "shop_tasks.py", "VALUE = 1 +\n", "VALUE = 4\n")
    wait_until(lambda: shop.processes()["worker"]["status"] == "ready", 60, "the fixed worker to be ready")
    assert value_now(client(shop)) == 4
    assert "restarting in" not in stack.output  # it waited for the fix, no crash loop


def test_a_file_the_api_imports_restarts_it_and_beat_takes_over(shop):
    stack = shop.up()
    before = shop.processes()
    edit(shop.dir / "app.py", 'celery = app  #', 'celery = app  # edited;')  # all three import the app
    wait_output(stack, r"reloaded .* — app.py$")
    wait_until(lambda: all(name in " ".join(p for p, _ in reloads(stack)) for name in ("api", "worker", "beat")),
               60, "api, worker and beat to reload")
    after = shop.processes()
    for name in ("api", "worker", "beat"):
        assert after[name]["pid"] != before[name]["pid"], f"{name} was not restarted"
    assert after["broker"]["pid"] == before["broker"]["pid"]
    edit(shop.dir / "web.py", "return {", "return {'edited': True, ")
    wait_output(stack, r"reloaded api in [\d.]+ s — web.py$")
    assert shop.processes()["worker"]["pid"] == after["worker"]["pid"]


@pytest.mark.unit
def test_lines_are_rewritten_to_run_the_bootstrap_in_their_own_interpreter(tmp_path):
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text("")
    (venv / "celery").write_text(f"#!{venv / 'python'}\nimport sys\n")
    (venv / "celery").chmod(0o755)
    script = str(foreign.bootstrap_path())
    path = str(venv)

    def command(line: str) -> str | None:
        return foreign.rewritten(describe("worker", line), path)
    assert command("celery -A app.celery worker -Q a,b") == f"{venv}/python {script} celery -A app.celery worker -Q a,b"
    assert command("uv run celery -A app worker") == f"uv run python {script} celery -A app worker"
    assert command("python3.12 -m celery --app=app beat") == f"python3.12 {script} celery --app=app beat"
    assert command("FOO=1 poetry run flask --app web run") == f"FOO=1 poetry run python {script} flask --app web run"
    for untouched in ("celery -A app worker -n $HOST", "celery worker", "celery -A app inspect ping",
                      "flask routes", "gunicorn web:app", "dify-local serve worker", "cd x && celery -A a worker"):
        assert command(untouched) is None, untouched
    spec = foreign.bootstrapped(describe("worker", "celery -A app worker"), {"PATH": path})
    assert foreign.mode(spec) == "takeover" and spec.role == "worker" and spec.argv[0] == "celery"


@pytest.mark.unit
def test_the_bootstrap_uses_the_names_of_process_env():
    for name in ("CHANNEL_FD", "WATCH_ROOTS", "STANDBY", "HANDOVER"):
        assert getattr(bootstrap, name) == getattr(process_env, name)


@pytest.mark.unit
def test_a_foreign_line_that_reported_its_imports_reloads_on_those_only(tmp_path):
    from runner.reload.plan import Candidate, plan_reload

    root, config = tmp_path.resolve(), tmp_path.resolve() / "local_config"
    tasks, app = root / "shop_tasks.py", root / "app.py"
    worker = Candidate("worker", True, frozenset({str(tasks), str(app)}), reads_config=False)
    beat = Candidate("beat", True, frozenset({str(app)}), reads_config=False)
    ours = Candidate("api", True, frozenset())
    plan = plan_reload({tasks, config / "local.env", root / "other.py"}, [worker, beat, ours], (root,), config, set())
    assert plan.reload == {"worker": [tasks], "api": [config / "local.env"]}


@pytest.mark.unit
def test_the_bootstrap_needs_nothing_but_the_standard_library_and_the_projects_own_celery_or_flask():
    import ast
    import sys

    tree = ast.parse(Path(bootstrap.__file__).read_text())
    nodes = list(ast.walk(tree))
    names = {alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module.split(".")[0] for node in nodes if isinstance(node, ast.ImportFrom) and node.module}
    assert names - sys.stdlib_module_names == {"celery", "flask"}
