"""The packaged binary (`./dev build`, build/dify-local.spec), run as a user without Python would:
copied into a temporary folder, with a clean environment (no virtualenv on PATH, no PYTHONPATH,
its own TMPDIR so its unpacked folders can be counted). It starts the whole stack from a project
that `init` wrote, runs a task through each of the 16 queues, is controlled from a second
invocation, stops on `down` and on Ctrl-C, and leaves no process and no `_MEI*` folder behind.

Without a built binary these tests skip (run `./dev build` first); CI builds it and sets
DIFY_LOCAL_REQUIRE_BINARY=1, so there they fail instead.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from runner.broker.session import compiled_session
from tests.conftest import Project
from tests.every_queue import run_a_task_on_every_queue
from tests.helpers import REPO, free_port, wait_until

pytestmark = pytest.mark.processes  # (their own brokers and stacks: never `unit`)

BUILT = Path(os.environ.get("DIFY_LOCAL_BINARY") or REPO / "dist" / "dify-local")
REQUIRED = os.environ.get("DIFY_LOCAL_REQUIRE_BINARY") == "1"


def _missing(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (DIFY_LOCAL_REQUIRE_BINARY=1)")
    pytest.skip(f"{reason}: build it with ./dev build")


def _built_binary() -> Path:
    if not BUILT.is_file():
        _missing(f"no binary at {BUILT}")
    built_at = BUILT.stat().st_mtime
    newer = [path for path in (REPO / "runner").rglob("*") if path.is_file() and path.stat().st_mtime > built_at]
    if newer and "DIFY_LOCAL_BINARY" not in os.environ:
        _missing(f"{BUILT} is older than {newer[0].relative_to(REPO)}")
    return BUILT


class BinaryProject(Project):
    @property
    def tmp(self) -> Path:
        return Path(self.base["TMPDIR"])

    def unpacked(self) -> list[str]:
        """The one-file binary's unpacked folders still in its TMPDIR."""
        return sorted(path.name for path in self.tmp.glob("_MEI*"))


@pytest.fixture
def binary_project(tmp_path: Path):
    built = _built_binary()
    folder = tmp_path / "bin"
    folder.mkdir()
    binary = folder / "dify-local"
    shutil.copy2(built, binary)
    for name in ("project", "home", "tmp"):
        (tmp_path / name).mkdir()
    clean = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp"),
             "LANG": "C.UTF-8"}
    made = BinaryProject(tmp_path / "project", free_port(), free_port(), program=[str(binary)], base=clean)
    yield made
    for proc in made.procs:
        proc.cleanup()


def test_the_binary_runs_the_stack_from_an_empty_folder(binary_project):
    project = binary_project
    assert project.run("--version").stdout.startswith("dify-local, version ")
    created = project.run("init")
    assert created.returncode == 0, created.stderr
    assert (project.dir / "Procfile").read_text().count("dify-local serve") == 4
    assert (project.dir / "local_config" / "defaults.env").is_file()

    stack = project.up()
    assert "16 queues" in stack.output and "(embedded)" in stack.output
    if compiled_session()[0] is not None:  # built here, so the binary must carry it
        assert "compiled read loop" in stack.output, stack.output
    run_a_task_on_every_queue(project)

    ps = project.run("ps")  # a second invocation of the binary, over the control socket
    assert ps.returncode == 0, ps.stderr
    rows = {line.split()[0]: line.split() for line in ps.stdout.splitlines()[1:5]}
    assert sorted(rows) == ["api", "beat", "broker", "worker"] and all(row[2] == "ready" for row in rows.values())
    assert project.run("logs", "-n", "5", "api").returncode == 0
    restarted = project.run("restart", "worker")
    assert restarted.returncode == 0, restarted.stderr
    pinged = project.run("inspect", "ping", "--timeout", "5")
    assert pinged.returncode == 0 and "worker@" in pinged.stdout, pinged.stdout + pinged.stderr
    queues = project.run("queues", "--json")
    assert queues.returncode == 0, queues.stderr
    doctor = project.run("doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    for command in (["config"], ["migrate"], ["topology"], ["export", "systemd", str(project.dir / "units")]):
        done = project.run(*command)
        assert done.returncode == 0, f"{command}: {done.stdout}\n{done.stderr}"
    assert (project.dir / "units").is_dir()

    down = project.run("down")
    assert down.returncode == 0, down.stderr
    assert stack.wait(60) == 0, stack.output
    assert stack.alive() == [], f"still running after down: {stack.alive()}\n{stack.output}"
    assert project.unpacked() == [], "the one-file binary left its unpacked folder"


def test_ctrl_c_leaves_no_process_and_no_unpacked_folder_and_a_renamed_binary_works(binary_project):
    project = binary_project
    renamed = Path(project.program[0]).with_name("dify-local-linux-x86_64")  # as a download is often named
    Path(project.program[0]).rename(renamed)
    project.program = [str(renamed)]
    assert project.run("init").returncode == 0
    stack = project.up()
    assert len(project.unpacked()) == 1, project.unpacked()  # the roles reuse `up`'s unpacked folder
    stack.tree()
    os.killpg(stack.popen.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the foreground group
    assert stack.wait(60) == 0, stack.output
    assert stack.alive() == [], f"still running after Ctrl-C: {stack.alive()}\n{stack.output}"
    assert project.unpacked() == []


WEB = """\
import os, sys, time
print("web started: LD_LIBRARY_PATH=%r bootloader=%r" % (os.environ.get("LD_LIBRARY_PATH"),
      sorted(name for name in os.environ if name.startswith("_PYI"))), flush=True)
time.sleep(3600)
"""


def test_reload_of_project_files_and_other_programs_get_a_clean_environment(binary_project):
    project = binary_project
    assert project.run("init").returncode == 0
    python = shutil.which("python3", path=project.base["PATH"])
    if python is None:
        pytest.skip("no python3 for the other project's process")
    (project.dir / "web.py").write_text(WEB)
    with (project.dir / "Procfile").open("a") as procfile:
        procfile.write(f"web: {python} web.py\n")
    stack = project.up(env={"LD_LIBRARY_PATH": "/opt/theirs"})
    started = stack.wait_for_line(r"web started: (.*)")
    assert "LD_LIBRARY_PATH='/opt/theirs' bootloader=[]" in started.group(0), started.group(0)

    # a change to local_config reloads dify-local's roles (each the binary again), not the broker
    (project.dir / "local_config" / "local.env").write_text("CELERY_WORKER_AMOUNT=3\n")
    reloaded = stack.wait_for_line(r"reloaded .* — local_config/local.env").group(0)
    assert all(name in reloaded for name in ("api", "worker", "beat")) and "broker" not in reloaded, reloaded
    wait_until(lambda: project.api.status("/health") == 200, 30, "the API to answer after the reload")
    # editing the other project's file restarts its process
    (project.dir / "web.py").write_text(WEB + "# edited\n")
    wait_until(lambda: stack.output.count("web started:") >= 2, 30, "web to restart after its edit")
    assert project.run("down").returncode == 0
    assert stack.wait(60) == 0, stack.output
    assert stack.alive() == [] and project.unpacked() == []
