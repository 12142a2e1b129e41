"""The topology of a project's own Celery app (tests/dify_shaped): Procfile lines recognised however
Celery is launched, the app imported by its own interpreter, the queue no worker consumes found by
`topology`, warned about by `up`, failed by `doctor`; a worker on a subset of queues accepted."""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

import psutil
import pytest
from celery import Celery

from runner.supervisor.procfile import describe
from runner.topology import QUEUE_NAMES
from tests.helpers import BIN, base_env, wait_until

LINES = {
    "celery -A app.celery worker -P threads -c 2 -Q a,b": ("worker", "app.celery", ("a", "b"), ()),
    "uv run celery -A app.celery worker -Q x": ("worker", "app.celery", ("x",), ("uv", "run", "python")),
    "uv --directory api run celery -A app.celery beat --loglevel INFO":
        ("beat", "app.celery", None, ("uv", "--directory", "api", "run", "python")),
    "uv run --with x -n celery --app app.celery worker -n w@%h -Q q":
        ("worker", "app.celery", ("q",), ("uv", "run", "--with", "x", "-n", "python")),
    "poetry run celery --app=app.celery worker": ("worker", "app.celery", None, ("poetry", "run", "python")),
    "pipenv run python -m celery -A app worker": ("worker", "app", None, ("pipenv", "run", "python")),
    ".venv/bin/celery -A app.celery worker -Qdataset": ("worker", "app.celery", ("dataset",), (".venv/bin/python",)),
    "/srv/env/bin/python3.12 -m celery -A app.celery beat": ("beat", "app.celery", None, ("/srv/env/bin/python3.12",)),
    "python3 -m celery -A app.celery worker": ("worker", "app.celery", None, ("python3",)),
    "celery worker -A app.celery": ("worker", "app.celery", None, ()),
    "celery -A beat worker": ("worker", "beat", None, ()),  # the app's name is not the subcommand
    "uv run flask run --port 5001": (None, None, None, ()),
    "python -m flask run": (None, None, None, ()),
    "uv run": (None, None, None, ()),
}


@pytest.mark.parametrize("command", list(LINES))
def test_celery_lines_are_recognised_through_every_launcher(command):
    spec = describe("p", command)
    assert (spec.role, spec.celery_app, spec.queues, spec.python) == LINES[command]


def test_our_own_lines_keep_their_roles():
    spec = describe("worker", "dify-local serve worker -Q dataset,priority_dataset")
    assert (spec.role, spec.queues, spec.celery_app, spec.is_ours) == ("worker", ("dataset", "priority_dataset"),
                                                                       None, True)


# -- the app asked of itself ------------------------------------------------------------------------

FIXTURE = Path(__file__).with_name("dify_shaped")
BUG_QUEUE = "trigger_refresh_publisher"
BUG_TASK = "schedule.trigger_provider_refresh_task.trigger_provider_refresh"


def dify_shaped(project, procfile: str | None = None) -> None:
    """The fixture copied into the test's project (optionally with another Procfile)."""
    shutil.copytree(FIXTURE, project.dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    if procfile is not None:
        (project.dir / "Procfile").write_text(procfile)


def worker_line(queues: str, launcher: str = "") -> str:
    return f"worker: {launcher}celery -A app.celery worker -P threads -c 2 -l INFO -Q {queues}\n"


def test_topology_lists_the_apps_tasks_schedule_and_the_queue_no_worker_consumes(project):
    dify_shaped(project)
    result = project.run("topology", "--json")
    assert result.returncode == 1, result.stderr  # a queue nobody consumes
    data = json.loads(result.stdout)
    queues = {queue["name"]: queue for queue in data["queues"]}
    # task options, task_routes and tasks outside dify-local's 16, as Celery's router sends them
    assert queues["dataset_summary"]["tasks"] == ["tasks.generate_summary_index_task.generate_summary_index_task"]
    assert queues["ops_trace"]["tasks"] == ["tasks.ops_trace_task.process_trace_tasks"]  # by task_routes
    assert queues["api_token"]["consumed_by"] == ["worker"]
    assert queues[BUG_QUEUE] == {"name": BUG_QUEUE, "tasks": [BUG_TASK], "consumed_by": []}
    # beat's schedule from the ENABLE_* switches (.env turns clean_messages on; the environment wins)
    schedule = {entry["name"]: entry for entry in data["periodic"]}
    assert set(schedule) == {"clean_messages", "workflow_schedule_task", "trigger_provider_refresh"}
    assert schedule["trigger_provider_refresh"]["queue"] == BUG_QUEUE
    assert schedule["workflow_schedule_task"]["schedule"] == "every 1 min"
    assert schedule["clean_messages"]["schedule"].startswith("crontab 0 4")
    assert [problem for problem in data["problems"] if BUG_QUEUE in problem] == data["problems"] != []
    off = project.run("topology", "--json", env={"ENABLE_CLEAN_MESSAGES": "false"})
    assert "clean_messages" not in {entry["name"] for entry in json.loads(off.stdout)["periodic"]}
    # the table says the same
    table = project.run("topology")
    row = next(line for line in table.stdout.splitlines() if line.startswith(BUG_QUEUE))
    assert "NOBODY" in row and BUG_TASK in row and BUG_QUEUE in table.stderr


def test_topology_with_every_queue_consumed_passes(project):
    dify_shaped(project)
    procfile = (project.dir / "Procfile").read_text().replace("-Q dataset,", f"-Q {BUG_QUEUE},dataset,")
    (project.dir / "Procfile").write_text(procfile)
    result = project.run("topology", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["problems"] == []


def test_an_app_that_fails_to_import_is_one_line_with_its_last_traceback_line(project):
    dify_shaped(project)
    (project.dir / "configs" / "__init__.py").write_text("import flask_missing_extension\n")
    result = project.run("topology")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"dify-local: cannot import app.celery with `{sys.executable}` in {project.dir}: "
        "ModuleNotFoundError: No module named 'flask_missing_extension'"]
    assert "Traceback" not in result.stderr + result.stdout


def test_an_app_that_hangs_on_import_is_cut_off_with_progress(project, monkeypatch):
    from runner import app_topology
    from runner.supervisor.procfile import describe

    dify_shaped(project)
    (project.dir / "configs" / "__init__.py").write_text("import time\nprint('connecting…', flush=True)\n"
                                                         "time.sleep(600)\n")
    monkeypatch.setattr(app_topology, "PROGRESS_EVERY", 0.2)
    said: list[str] = []
    line = describe("worker", worker_line("dataset", f"{BIN}/").strip().partition(": ")[2])
    with pytest.raises(app_topology.AppTopologyError) as raised:
        app_topology.probe(line, project.dir, timeout=1.5, progress=said.append, env=base_env())
    assert "did not finish within 1.5 s; its last line: connecting…" in str(raised.value)
    assert said and all(text.startswith("still importing app.celery") for text in said)
    assert probes_in(project.dir) == []
    cancel = threading.Event()  # the stack stopping: the import is cut off, not left to run on
    threading.Timer(0.5, cancel.set).start()
    with pytest.raises(app_topology.AppTopologyError, match="importing app.celery was cancelled"):
        app_topology.probe(line, project.dir, timeout=60, env=base_env(), cancel=cancel)
    assert probes_in(project.dir) == []


def probes_in(folder: Path) -> list[int]:
    """Pids of probe processes running in `folder`."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "cwd"]):
        if any("app_topology_probe" in part for part in process.info["cmdline"] or ()) \
                and process.info["cwd"] == str(folder):
            found.append(process.info["pid"])
    return found


def fake_launchers(project) -> dict[str, str]:
    """Fake `uv` and `poetry` on PATH: each records that it ran, then runs the rest (after `run`) with
    this virtualenv, as `uv run celery …` runs in a Dify checkout. The environment that finds them."""
    fake = project.dir / "fakebin"
    fake.mkdir(exist_ok=True)
    for name in ("uv", "poetry"):
        script = fake / name
        script.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {project.dir}/launched\n"
                          f"shift  # run\nexec env PATH={BIN}:$PATH \"$@\"\n")
        script.chmod(0o755)
    return {"PATH": f"{fake}:/usr/bin:/bin"}


def test_uv_and_poetry_style_wrappers_run_the_apps_own_interpreter(project):
    dify_shaped(project)
    env = fake_launchers(project)
    for launcher in ("uv run ", "poetry run "):
        dify_shaped(project, worker_line(f"{BUG_QUEUE},dataset", launcher))
        result = project.run("topology", "--json", env=env)
        data = json.loads(result.stdout)
        assert data["app"]["python"] == f"{launcher}python"
        consumed = {queue["name"]: queue["consumed_by"] for queue in data["queues"]}
        assert consumed[BUG_QUEUE] == ["worker"] and consumed["mail"] == []
    assert [line.split()[0].rsplit("/", 1)[1] for line in (project.dir / "launched").read_text().splitlines()] \
        == ["uv", "poetry"]


def test_a_worker_through_uv_run_is_a_worker_under_up(project):
    """Readiness by a Celery ping and a warm stop, as for any worker line."""
    dify_shaped(project)
    queues = describe("w", (project.dir / "Procfile").read_text().splitlines()[1].split(": ", 1)[1]).queues
    (project.dir / "Procfile").write_text(worker_line(",".join((BUG_QUEUE, *queues)), "uv run "))
    stack = project.up("--no-reload", env=fake_launchers(project))
    row = project.processes()["worker"]
    assert (row["role"], row["ready"]) == ("worker", True)
    stack.wait_for_line(r"every queue its 11 tasks and 3 periodic entries go to has a worker", 30)
    doctor = json.loads(project.run("doctor", "--json", env=fake_launchers(project)).stdout)
    consumers = next(check for check in doctor["checks"] if check["name"] == "consumers")
    assert consumers["status"] == "pass" and "queues of app.celery with routed tasks have a live consumer" \
        in consumers["detail"], consumers
    stack.signal(signal.SIGINT)
    assert stack.wait(60) == 0
    assert stack.alive() == []


def test_up_warns_about_the_unconsumed_queue_and_doctor_fails_on_it(project):
    """A worker on a subset of queues starts (never refused); the queue no worker consumes is said at
    start; doctor fails on it, counts Celery's own beat as a beat and skips our migrations."""
    dify_shaped(project)
    stack = project.up("worker", "beat")
    stack.wait_for_line(rf"warning: queue '{BUG_QUEUE}' has tasks routed to it \({re.escape(BUG_TASK)}\)", 60)
    # a queue outside dify-local's 16, consumed by the app's own worker
    sender = Celery(broker=project.broker_url)
    try:
        sender.send_task("tasks.generate_summary_index_task.generate_summary_index_task", args=["kb", "doc-1"],
                         queue="dataset_summary")
    finally:
        sender.close()
    stack.wait_for_line(r"worker +\| .*Task tasks\.generate_summary_index_task\.generate_summary_index_task\[.*\] "
                        r"succeeded", 30)
    result = project.run("doctor", "--json")
    assert result.returncode == 1
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}
    assert checks["consumers"]["status"] == "fail" and BUG_QUEUE in checks["consumers"]["detail"]
    assert checks["consumers"]["data"]["unconsumed"] == {BUG_QUEUE: [BUG_TASK]}
    assert checks["migrations"]["status"] == "skip" and checks["documents"]["status"] == "skip"
    assert checks["beat"]["status"] == "pass" and "Celery's own beat" in checks["beat"]["detail"]
    assert checks["worker"]["status"] == "pass" and "the project's own Celery worker" in checks["worker"]["detail"]
    assert not project.database.exists()  # nothing of our backend was made
    # `queues` lists the app's queues beside our 16: the bug's with its task and no consumer
    queues = {row["name"]: row for row in json.loads(project.run("queues", "--json").stdout)["queues"]}
    assert queues[BUG_QUEUE]["app_tasks"] == [BUG_TASK] and queues[BUG_QUEUE]["consumers"] == []
    assert queues["dataset_summary"]["consumers"] != [] and queues["api_token"]["app_tasks"]
    stack.signal(signal.SIGINT)
    assert stack.wait(60) == 0


def test_our_worker_on_a_subset_of_queues_is_not_refused(project):
    """`dify-local serve worker -Q dataset,priority_dataset` (the seed's own tip) starts; the queues
    left out are a warning."""
    (project.dir / "Procfile").write_text("worker: dify-local serve worker -Q dataset,priority_dataset\n")
    stack = project.up()
    assert "warning: queue 'retention' has tasks routed to it (clean_task_runs_task" in stack.output
    topology_result = project.run("topology")
    assert topology_result.returncode == 1 and "retention" in topology_result.stderr
    stack.signal(signal.SIGINT)
    assert stack.wait(60) == 0


def test_our_worker_on_a_queue_our_backend_does_not_have_is_refused(project):
    (project.dir / "Procfile").write_text("worker: dify-local serve worker -Q dataset,datset\n")
    result = project.run("up")
    assert result.returncode == 2
    assert "process 'worker' (-Q): unknown queue 'datset' for dify-local's worker" in result.stderr


# -- init --dify ------------------------------------------------------------------------------------

def test_init_dify_writes_a_procfile_from_the_apps_routes(project):
    dify_shaped(project)
    (project.dir / "Procfile").unlink()
    result = project.run("init", "--dify")
    assert result.returncode == 0, result.stderr
    assert "first: cp .env.example" not in result.stdout  # there is a .env
    lines = dict(line.split(": ", 1) for line in (project.dir / "Procfile").read_text().splitlines())
    assert lines["api"] == "flask run --host 127.0.0.1 --port 5001 --debug"
    assert lines["beat"] == "celery -A app.celery beat --loglevel INFO"
    worker = describe("worker", lines["worker"])
    assert (worker.role, worker.celery_app) == ("worker", "app.celery")
    topology = json.loads(project.run("topology", "--json").stdout)
    assert set(worker.queues) == {queue["name"] for queue in topology["queues"]}  # every routed queue, the bug's too
    assert BUG_QUEUE in worker.queues and worker.queues[0] == "priority_dataset" and topology["problems"] == []
    again = project.run("init", "--dify")
    assert again.returncode == 1 and "has a Procfile already; nothing was written (--force rewrites it)" in again.stderr
    (project.dir / "Procfile").write_text("mine: true\n")
    assert project.run("init", "--dify", "--force").returncode == 0
    assert "worker: celery -A app.celery worker" in (project.dir / "Procfile").read_text()


def test_init_dify_uses_uv_and_falls_back_to_difys_documented_queues(project):
    """With uv.lock the lines run through `uv run`; an app that cannot be imported gives Dify's
    documented queue list and a warning."""
    from runner.cli.init_dify import DIFY_DOCUMENTED_QUEUES

    dify_shaped(project)
    (project.dir / "Procfile").unlink()
    (project.dir / "uv.lock").write_text("")
    (project.dir / ".env").rename(project.dir / ".env.example")
    result = project.run("init", "--dify", env={"PATH": "/usr/bin:/bin"})  # no uv here
    assert result.returncode == 0, result.stderr
    assert "first: cp .env.example .env" in result.stdout
    assert "warning: the worker's -Q is Dify's documented list, not the app's: cannot run `uv`" in result.stderr
    procfile = (project.dir / "Procfile").read_text()
    assert procfile.startswith("api: uv run flask run --host 127.0.0.1 --port 5001")
    worker = describe("worker", procfile.splitlines()[1].split(": ", 1)[1])
    assert worker.queues == DIFY_DOCUMENTED_QUEUES and worker.python == ("uv", "run", "python")


def test_init_dify_outside_a_dify_folder_is_refused(project):
    result = project.run("init", "--dify")
    assert result.returncode == 2 and "has no app.py: run `dify-local init --dify` in a Dify checkout's api/ folder" \
        in result.stderr
    assert not (project.dir / "Procfile").exists()


def test_celery_queues_is_checked_against_the_app_the_worker_runs(project):
    """A Dify .env's CELERY_QUEUES with Dify's own queues is a setting like any (config reads it);
    our backend's worker refuses a queue it has no task for, naming where it came from."""
    env = {"CELERY_QUEUES": "dataset,dataset_summary"}
    config = project.run("config", "--json", env=env)
    assert config.returncode == 0, config.stderr
    assert project.run("serve", "worker", env=env).stderr.strip() == (
        "dify-local: CELERY_QUEUES: unknown queue 'dataset_summary' for dify-local's worker; allowed: "
        + ", ".join(QUEUE_NAMES))
    refused = project.run("up", env=env)
    assert refused.returncode == 2 and "process 'worker' (CELERY_QUEUES): unknown queue 'dataset_summary'" \
        in refused.stderr
    dify_shaped(project)  # the same setting beside a project's own app: not ours to judge
    assert project.run("topology", "--json", env=env).returncode == 1  # (its own unconsumed queue only)


def test_the_probe_sees_the_projects_modules_not_dify_locals(project):
    """runner/ (the probe's folder) has app.py, celery_app.py, topology.py …: none may stand in for
    the project's. `-A app` naming a module whose `app` is Flask is Celery's error, said in one line."""
    (project.dir / "app.py").write_text("import celery_app  # dify-local has one; this project does not\n")
    (project.dir / "Procfile").write_text("worker: celery -A app.celery worker\n")
    result = project.run("topology")
    assert result.returncode == 1 and "ModuleNotFoundError: No module named 'celery_app'" in result.stderr
    dify_shaped(project, "worker: celery -A app worker\n")
    result = project.run("topology")
    assert result.returncode == 1 and "TypeError: app is a Flask, not a Celery app" in result.stderr


def test_doctor_judges_the_apps_procfile_even_with_the_stack_down(project):
    dify_shaped(project)
    checks = {check["name"]: check for check in json.loads(project.run("doctor", "--json").stdout)["checks"]}
    assert checks["broker"]["status"] == "fail"  # nothing runs
    assert checks["consumers"]["status"] == "fail" and checks["consumers"]["data"]["unconsumed"] == {
        BUG_QUEUE: [BUG_TASK]}
    assert checks["migrations"]["status"] == "skip"
    (project.dir / "configs" / "__init__.py").write_text("raise RuntimeError('SECRET_KEY is not set')\n")
    checks = {check["name"]: check for check in json.loads(project.run("doctor", "--json").stdout)["checks"]}
    assert checks["consumers"]["status"] == "fail"
    assert checks["consumers"]["detail"].endswith("RuntimeError: SECRET_KEY is not set")


def test_an_app_reading_the_brokers_address_as_it_imports_gets_it(project):
    """As under `up`: CELERY_BROKER_URL is the embedded broker's (the app connects to nothing)."""
    (project.dir / "tasks.py").write_text(
        "import os\nfrom celery import Celery\n\n"
        "app = Celery('shop', broker=os.environ['CELERY_BROKER_URL'])\n"
        "app.conf.task_routes = {'tasks.add': {'queue': 'sums'}}\n\n\n"
        "@app.task\ndef add(a, b):\n    return a + b\n")
    (project.dir / "Procfile").write_text("worker: celery -A tasks worker -Q sums\n")
    result = project.run("topology", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["queues"] == [{"name": "sums", "tasks": ["tasks.add"], "consumed_by": ["worker"]}]


def test_the_probes_output_is_capped(project, monkeypatch):
    from runner import app_topology

    dify_shaped(project)
    monkeypatch.setattr(app_topology, "MAX_OUTPUT", 1000)  # the fixture's topology is about 3 KB
    line = describe("worker", f"{BIN}/celery -A app.celery worker")
    with pytest.raises(app_topology.AppTopologyError, match="over 1,000 bytes of JSON: not read"):
        app_topology.probe(line, project.dir, env=base_env())
    monkeypatch.setattr(app_topology, "MAX_OUTPUT", 1 << 20)
    assert len(app_topology.probe(line, project.dir, env=base_env()).tasks) == 11


def test_a_bare_celery_runs_the_python_its_script_names(tmp_path):
    """`celery` on PATH whose folder has no `python` (a pipx or system install): its #! line's."""
    from runner.app_topology import python_command

    (tmp_path / "celery").write_text("#!/opt/tools/bin/python3.12 -s\nimport celery\n")
    (tmp_path / "celery").chmod(0o755)
    assert python_command(describe("w", "celery -A app worker"), {"PATH": str(tmp_path)}) == \
        ("/opt/tools/bin/python3.12", "-s")
    assert python_command(describe("w", "celery -A app worker"), {"PATH": str(tmp_path / "none")}) == ("python3",)
    assert python_command(describe("w", "uv run celery -A app worker"), {}) == ("uv", "run", "python")


def test_a_doctor_stopped_while_the_app_imports_leaves_no_import_behind(project):
    dify_shaped(project)
    (project.dir / "configs" / "__init__.py").write_text("import time\ntime.sleep(600)\n")
    doctor = project.start("doctor")
    wait_until(lambda: probes_in(project.dir), 20, "the app's import to start")
    doctor.signal(signal.SIGINT)
    doctor.wait(20)
    wait_until(lambda: not probes_in(project.dir), 10, "the import to be gone with doctor")


@pytest.mark.parametrize("argv,role", [
    (["/srv/.venv/bin/python", "/srv/.venv/bin/celery", "-A", "app.celery", "beat", "-l", "INFO"], "beat"),
    (["/usr/bin/python3", "-m", "celery", "-A", "app.celery", "worker"], "worker"),
    (["celery", "-A", "beat", "worker"], "worker"),
    (["/srv/.venv/bin/python", "/srv/.venv/bin/flask", "run"], None),
    (["python3", "beat.py"], None),
])
def test_running_celery_processes_are_recognised_from_their_argv(argv, role):
    from runner.supervisor.procfile import running_celery_role

    assert running_celery_role(argv) == role


def test_doctor_counts_a_celery_beat_started_by_hand_in_the_project(project):
    dify_shaped(project)
    broker = project.serve_broker()
    assert broker.alive()
    beat = project.start(argv=[str(BIN / "celery"), "-A", "app.celery", "beat", "-l", "INFO"],
                         env={"CELERY_BROKER_URL": project.broker_url})
    beat.wait_for_line(r"beat: Starting", 30)
    checks = {check["name"]: check for check in json.loads(project.run("doctor", "--json").stdout)["checks"]}
    assert checks["beat"]["status"] == "pass" and "Celery's own beat runs: celery" in checks["beat"]["detail"]
