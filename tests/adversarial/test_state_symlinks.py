"""A symbolic link at every state path: what it points to, outside the state folder, is never read,
written, truncated or removed, and the link is named in one line saying to remove it.

The paths come from runner.state (StatePaths.places()), so a new state path is covered here without
touching this file; beside them, the paths whose names are not fixed (the processes' logs and a
rotated one) and the embedded broker's own files (runner/broker/aof.py).
Three ways in: a link planted before `up` at the path, a link planted at the folder above it, and
links planted under a running stack at the file store's folders, where each is written at work time.
"""

from __future__ import annotations

import io
import os
import signal
import zipfile
from pathlib import Path

import pytest

from runner.state import FOLDER, StatePaths
from tests.conftest import Project, made_project
from tests.helpers import wait_until

pytestmark = pytest.mark.processes  # (their own brokers and stacks: never `unit`)

OUTSIDE_TEXT = "outside the state folder: must stay exactly as it is\n"
PROCESSES = ("broker", "api", "worker", "beat", "system")  # the built-in stack's log files, and up's own


def state_paths() -> list:
    """(path relative to the state folder, kind) for every state path, one pytest param each."""
    rows = [pytest.param("", FOLDER, id="state-folder")]
    rows += [pytest.param(place.relative.as_posix(), place.kind, id=name)
             for name, place in StatePaths.places().items()]
    rows += [pytest.param(f"logs/{name}.log", "file", id=f"logs/{name}.log") for name in PROCESSES]
    rows += [pytest.param("logs/worker.log.1", "file", id="logs/worker.log.1")]
    rows += [pytest.param(f"broker/{name}", "file", id=f"broker/{name}")
             for name in ("appendonly.aof", "appendonly.rewrite")]
    return rows


def file_paths() -> list:
    """A state file in each folder that holds some, for the link at that folder (the broker's
    files too: their folder is a state path of ours)."""
    rows, folders = [], set()
    for row in state_paths():
        relative, kind = row.values
        folder = relative.rpartition("/")[0]
        if kind != FOLDER and folder not in folders:
            folders.add(folder)
            rows.append(pytest.param(relative, kind, id=f"{folder or 'state-folder'}/ (for {relative})"))
    return rows


def make_target(outside: Path, kind: str, name: str) -> Path:
    """Something outside the state folder for a link to point at: a file, or a folder with a file."""
    if kind == FOLDER:
        target = outside / "a-folder"
        target.mkdir(parents=True)
        (target / "keep.txt").write_text(OUTSIDE_TEXT)
    else:
        target = outside / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(OUTSIDE_TEXT)
    return target


def plant(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=target.is_dir())


def snapshot(folder: Path) -> dict[str, str | None]:
    """Every name under `folder` with its content (None for a folder)."""
    return {str(path.relative_to(folder)): (path.read_text(errors="replace") if path.is_file() else None)
            for path in sorted(folder.rglob("*"))}


def run_stack_once(project: Project) -> str:
    """`up`, until it refuses (exits) or is ready; a stack that ran is then stopped. Its output."""
    proc = project.start("up")
    wait_until(lambda: proc.popen.poll() is not None or "ready in" in proc.output, 120,
               "`up` to refuse the link or to be ready")
    if proc.popen.poll() is None:
        proc.signal(signal.SIGINT)
        proc.wait(60)
    wait_until(lambda: not proc.alive(), 20, "every process of the stack to be gone")
    return proc.output


def assert_refused(output: str, link: Path) -> None:
    assert "Traceback" not in output, output
    assert f"{link} is a symbolic link" in output, output
    assert "ready in" not in output, output


@pytest.mark.parametrize("relative, kind", state_paths())
def test_a_link_at_a_state_path_is_refused_before_anything_opens_it(project, tmp_path, relative, kind):
    """Planted before `up`: `up` refuses with one line naming the link, and its target is as it was."""
    outside = tmp_path / "outside"
    link = project.state / relative if relative else project.state
    plant(link, make_target(outside, kind, link.name))
    before = snapshot(outside)

    output = run_stack_once(project)
    assert snapshot(outside) == before
    assert_refused(output, link)


@pytest.mark.parametrize("relative, kind", file_paths())
def test_a_linked_folder_above_a_state_file_redirects_nothing(project, tmp_path, relative, kind):
    """The folder holding a state file is a link to a folder outside that holds a file of the same
    name (for a file directly in the state folder, the state folder itself is the link)."""
    outside = tmp_path / "outside"
    path = project.state / relative
    link = path.parent
    make_target(outside / "a-folder", kind, path.name)
    plant(link, outside / "a-folder")
    before = snapshot(outside)

    output = run_stack_once(project)
    assert snapshot(outside) == before
    assert_refused(output, link)


def test_the_table_covers_every_state_path():
    """Each place of StatePaths is a row above (so a place added to runner/state.py is tested), and
    each folder of the file store has a case planted while the stack runs (below)."""
    rows = {row.values[0] for row in state_paths()}
    places = StatePaths.places()
    assert {place.relative.as_posix() for place in places.values()} <= rows
    in_file_store = {name for name, place in places.items()
                     if place.kind == FOLDER and place.relative.parts[0] == "files"}
    assert in_file_store <= set(RUNTIME_CASES), sorted(in_file_store - set(RUNTIME_CASES))


# -- links planted under a running stack -------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with made_project(tmp_path_factory.mktemp("links")) as running:
        running.up()
        yield running


def finished(stack: Project, poll: str) -> dict:
    def done():
        body = stack.api.get(poll)[1]
        return body if body["state"] in ("SUCCESS", "FAILURE") else None
    return wait_until(done, 60, f"the task at {poll} to finish")


def sent(stack: Project, reply: tuple[int, dict]) -> dict:
    status, body = reply
    assert status == 202, body
    return finished(stack, body["poll"])


def refused_task(result: dict, link: Path) -> str:
    """The failed task's error (at once: a link in the state folder is not retried), else all it said."""
    return result["error"]["message"] if result["state"] == "FAILURE" else repr(result)


def send_mail(stack: Project, link: Path) -> str:
    result = sent(stack, stack.api.post("/v1/tasks/send_mail_task", {"args": ["dev@example.com", "Hi", "text"]}))
    return refused_task(result, link)


def upload_document(stack: Project, link: Path) -> str:
    status, dataset = stack.api.post("/v1/datasets", {"name": "links"})
    assert status == 201, dataset
    status, body = stack.api.post(f"/v1/datasets/{dataset['id']}/documents", {"name": "a.txt", "text": "hello"})
    return f"{status}: {body['error'] if status == 500 else body}"


def save_run_log(stack: Project, link: Path) -> str:
    graph = {"nodes": [{"id": "start", "type": "start"}, {"id": "end", "type": "end"}],
             "edges": [{"source": "start", "target": "end"}]}
    ran = sent(stack, stack.api.post("/v1/workflows/run", {"graph": graph}))
    assert ran["state"] == "SUCCESS", ran
    result = sent(stack, stack.api.post("/v1/tasks/save_workflow_run_log_task", {"args": [ran["result"]["run_id"]]}))
    return refused_task(result, link)


def plugin_package() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("manifest.yaml", "version: 1.0.0\nauthor: me\nname: linked\n")
        archive.writestr("tool.py", "x = 1\n")
    return buffer.getvalue()


def upload_plugin(stack: Project, link: Path) -> str:
    status, body = stack.api.request("POST", "/v1/plugins", raw=plugin_package(),
                                     headers={"Content-Type": "application/zip"})
    if status != 202:  # the upload itself is refused (a link at plugin-packages)
        return f"{status}: {body}"
    return refused_task(finished(stack, body["poll"]), link)


def clean_temp_files(stack: Project, link: Path) -> str:
    return refused_task(sent(stack, stack.api.post("/v1/tasks/clean_temp_files_task", {"args": []})), link)


# the file store's folders, each with the work that writes (or removes) there
RUNTIME_CASES = {
    "files": send_mail,
    "outbox": send_mail,
    "datasets": upload_document,
    "run_logs": save_run_log,
    "plugin_packages": upload_plugin,
    "plugins": upload_plugin,
    "temp": clean_temp_files,
}


@pytest.mark.parametrize("name", list(RUNTIME_CASES))
def test_a_link_planted_under_a_running_stack_is_refused_where_it_is_written(stack, tmp_path, name):
    """The work refuses with the link named (a 500 from the API, a failed task), and what the link
    points to is untouched: no file written there, none removed (temporary files an hour old)."""
    folder = getattr(StatePaths(stack.state), name)
    outside = tmp_path / "outside"
    target = make_target(outside, FOLDER, "")
    old = target / "old.tmp"
    old.write_text(OUTSIDE_TEXT)
    os.utime(old, (0, 0))  # far older than DIFY_LOCAL_TEMP_FILE_HOURS: retention would remove it
    aside = folder.with_name(folder.name + ".aside")
    if folder.exists():
        folder.rename(aside)
    plant(folder, target)
    before = snapshot(outside)
    try:
        message = RUNTIME_CASES[name](stack, folder)
    finally:
        folder.unlink()
        if aside.exists():
            aside.rename(folder)
    assert snapshot(outside) == before
    assert f"{folder} is a symbolic link" in message, message
