"""Task definitions come from the task modules' source, never from importing them: the API (and beat)
stay out of the task modules, so editing one restarts only the worker, while the API's listing and
argument check follow the file as it is now."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import typing
import uuid
from pathlib import Path
from typing import Any

import pytest

from runner.api.arguments import ArgumentError, check_arguments
from runner.task_catalogue import read_catalogue
from tests.helpers import REPO, wait_until

DEMO = '''
raise SystemExit("reading the catalogue imported this module")

from typing import Optional
from runner.tasks.base import task

LIMIT = 5


@task("demo_task")
def demo_task(self, to: str, count: int = 3, ratio: float = 0.5, tags: list[str] | None = None, *,
              mode: "Optional[str]" = None, limit=LIMIT, extra: SomeClass = None, **options) -> dict:
    """Say hello.

    More about it."""


@task(name="other_task", queue="ignored")
async def other(self, *items: int, weird: Optional[int, str] = 1, odd: "no (" = 2): ...


def helper(self, x: int): ...
'''


@pytest.fixture
def module(tmp_path, monkeypatch):
    """A task module in a fresh package on sys.path: its dotted name and its file."""
    package = f"catalogue_demo_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    path = tmp_path / package / "demo.py"
    path.write_text(DEMO)
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{package}.demo", path


def rewrite(path: Path, text: str) -> None:
    """Replace the file, its mtime moved on a second so coarse file-system clocks see the change."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def test_signature_defaults_hints_and_description_from_source(module):
    name, _ = module
    catalogue = read_catalogue((name,))
    assert catalogue.unreadable == {} and set(catalogue.tasks) == {"demo_task", "other_task"}
    demo = catalogue.tasks["demo_task"]
    assert str(demo.signature) == (
        "(to: str, count: int = 3, ratio: float = 0.5, tags: list[str] | None = None, *, "
        "mode: Optional[str] = None, limit=LIMIT, extra: SomeClass = None, **options) -> dict")
    assert demo.description == "Say hello."
    assert demo.hints == {"to": str, "count": int, "ratio": float, "tags": typing.Union[list, None],
                          "mode": typing.Optional[str], "extra": Any}
    other = catalogue.tasks["other_task"]
    assert str(other.signature) == "(*items: int, weird: Optional[int, str] = 1, odd: no ( = 2)"
    assert other.hints == {"weird": Any, "odd": Any}  # annotations it cannot read relax the check
    assert name not in sys.modules  # read, never imported (importing it raises SystemExit)


def test_check_arguments_against_the_source_signature(module):
    demo = read_catalogue((module[0],)).tasks["demo_task"]
    check_arguments("demo_task", demo.signature, demo.hints, ["a@b.co"], {"tags": None, "extra": object()})
    check_arguments("demo_task", demo.signature, demo.hints, ["a@b.co", 2, 1], {"mode": "x", "other": 1})
    with pytest.raises(ArgumentError, match="argument 'count' must be an integer, got a string; the task is demo_task"):
        check_arguments("demo_task", demo.signature, demo.hints, ["a@b.co", "many"], {})
    with pytest.raises(ArgumentError, match="missing a required argument: 'to'"):
        check_arguments("demo_task", demo.signature, demo.hints, [], {})


def test_a_changed_file_is_read_again_and_an_unchanged_one_is_not(module):
    name, path = module
    first = read_catalogue((name,)).tasks["demo_task"]
    assert read_catalogue((name,)).tasks["demo_task"] is first  # cached while the file is unchanged
    rewrite(path, DEMO.replace("**options) -> dict:", "retries: int = 0, **options) -> dict:"))
    changed = read_catalogue((name,)).tasks["demo_task"]
    assert "retries: int = 0" in str(changed.signature) and changed.hints["retries"] is int


def test_a_syntax_error_leaves_its_tasks_unchecked_and_is_logged_once(module, caplog):
    name, path = module
    caplog.set_level(logging.WARNING, logger="dify_local.tasks")
    rewrite(path, DEMO.replace("def demo_task(self,", "def demo_task(self"))
    for _ in range(3):
        catalogue = read_catalogue((name,))
    assert list(catalogue.unreadable) == [name] and "line " in catalogue.unreadable[name]
    unchecked = catalogue.lookup("demo_task")
    assert unchecked.signature is None and str(path) in unchecked.unknown_because
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and str(path) in warnings[0] and "unchecked" in warnings[0]

    rewrite(path, DEMO)  # fixed: checked again
    assert read_catalogue((name,)).lookup("demo_task").signature is not None
    assert len(caplog.records) == 1


def test_missing_source_is_one_log_line_and_unknown_names_stay_unknown(module, caplog):
    name, _ = module
    caplog.set_level(logging.WARNING, logger="dify_local.tasks")
    missing = f"{name.split('.')[0]}.not_there"
    for _ in range(2):
        catalogue = read_catalogue((name, missing))
    assert catalogue.unreadable == {missing: "source file not found"}
    assert catalogue.lookup("demo_task").signature is not None
    assert catalogue.lookup("maybe_in_the_missing_one").signature is None  # sent unchecked, not refused
    assert read_catalogue((name,)).lookup("no_such_task") is None  # every source read: truly unknown
    assert [record.getMessage() for record in caplog.records] == [
        f"task source not found for {missing}: their tasks are sent without checking arguments; "
        "a packaged binary must bundle runner/tasks/*.py as source (see build/README.md)"]


API_ROLE_PROBE = """
import json, sys
from runner.api import create_api
from runner.roles.api import api_celery
from runner.settings import load_settings

settings = load_settings()
celery, recorder = api_celery(settings)
client = create_api(settings, celery).test_client()
listed = client.get("/v1/tasks").get_json()["tasks"]
refused = client.post("/v1/tasks/send_mail_task", json={"args": ["a@b.co"]})
sent = client.post("/v1/tasks/send_mail_task", json={"args": ["a@b.co", "s", "b"]})
recorder.stop()
print(json.dumps({
    "task_modules": sorted(name for name in sys.modules if name.startswith("runner.tasks.")),
    "listed": {task["name"]: task["signature"] for task in listed},
    "refused": [refused.status_code, refused.get_json()["error"]],
    "sent": [sent.status_code, sent.get_json()["queue"]],
}))
"""


def test_the_api_role_imports_no_task_module(project):
    project.serve_broker()
    result = subprocess.run([sys.executable, "-c", API_ROLE_PROBE], cwd=project.dir, env=project.env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["task_modules"] == []
    assert seen["listed"]["send_mail_task"] == "send_mail_task(to: str, subject: str, body: str) -> dict"
    assert seen["refused"][0] == 400 and "missing a required argument: 'subject'" in seen["refused"][1]
    assert seen["sent"] == [202, "mail"]


def test_the_running_api_follows_an_edited_task_module(project, tmp_path):
    """A task gains a parameter: the same API process accepts it at once; a syntax error mid-edit is
    neither a crash nor a refusal."""
    copy = tmp_path / "code"
    shutil.copytree(REPO / "runner", copy / "runner", ignore=shutil.ignore_patterns("__pycache__"))
    mail = copy / "runner" / "tasks" / "mail.py"
    project.serve_broker()
    api = project.start(argv=[sys.executable, "-m", "runner", "serve", "api"], env={"PYTHONPATH": str(copy)})
    wait_until(lambda: project.api.status("/health/api") == 200, 30, "the API to be healthy")
    with_cc = {"args": ["a@b.co", "s", "b"], "kwargs": {"cc": "c@d.co"}}

    status, body = project.api.post("/v1/tasks/send_mail_task", with_cc)
    assert status == 400 and "unexpected keyword argument 'cc'" in body["error"], body

    original = mail.read_text()
    definition = "def send_mail_task(self, to: str, subject: str, body: str"
    assert original.count(definition) == 1
    rewrite(mail, original.replace(definition, f"{definition}, cc: str = ''"))
    status, body = project.api.post("/v1/tasks/send_mail_task", with_cc)
    assert status == 202 and body["queue"] == "mail" and "unchecked" not in body, body
    _, listed = project.api.get("/v1/tasks")
    listed_mail = next(task for task in listed["tasks"] if task["name"] == "send_mail_task")
    assert listed_mail["signature"] == "send_mail_task(to: str, subject: str, body: str, cc: str = '') -> dict"

    rewrite(mail, original.replace(definition, definition.replace("(self,", "(self")))  # mid-edit
    for _ in range(2):
        status, body = project.api.post("/v1/tasks/send_mail_task", {"args": [1]})
        assert status == 202 and "mail.py line" in body["unchecked"], body
    status, body = project.api.post("/v1/tasks/rag_pipeline_run_task", {"args": ["t", True]})
    assert status == 400, body  # other modules are still checked
    assert api.output.count("cannot read the tasks of") == 1, api.output
    assert api.popen.poll() is None and "Traceback" not in api.output, api.output
    assert str(copy) in api.output  # the copy's source was read, not the repository's
