"""Every error is one line: bad arguments to every command (huge, negative, not numbers, bytes that
are not UTF-8, missing files, folders where files go, targets that cannot be written), a wrong value
for every setting, and a state folder that cannot be used (a file, read-only, a corrupt database).

Each answer is one line on stderr naming what is wrong and what to do, never a traceback; exit
status 2 for bad input (arguments, settings), 1 for a state folder the user must repair. Under `up`,
a role that cannot start for such a reason says so once and is marked failed, not restarted.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from runner.errors import EXIT_USER_MUST_FIX
from runner.settings import SETTINGS
from tests.helpers import wait_until

HUGE = "100000000000000000000000"  # past SQLite's INTEGER, a C long, a timedelta
NOT_UTF8 = "\udcff"  # how Python hands over the byte 0xff of an argument that is not UTF-8

# (arguments, words the one line must hold)
BAD_ARGUMENTS = [
    (["failed", "show", HUGE], "'ID'"),
    (["failed", "retry", HUGE], "'ID'"),
    (["failed", "show", "--", "-1"], "'ID'"),
    (["failed", "show", NOT_UTF8], "'ID'"),
    (["failed", "--limit", HUGE], "--limit"),
    (["logs", "-n", "-1"], "--lines"),
    (["up", "--grace", "nan"], "--grace"),
    (["up", "--grace", "-1"], "--grace"),
    (["up", "--ready-timeout", "inf"], "--ready-timeout"),
    (["up", "--port", HUGE], "DIFY_PORT"),
    (["up", "--broker-port", "-1"], "REDIS_PORT"),
    (["up", "--state-dir", "a-file"], "is a file, not a folder"),
    (["up", "--state-dir", NOT_UTF8], "DIFY_LOCAL_STATE_DIR"),
    (["up", "-f", "/proc"], "--procfile"),
    (["up", "-f", "no-such-Procfile"], "--procfile"),
    (["up", "no-such-process"], "no-such-process"),
    (["serve", "api", "--port", "0"], "DIFY_PORT"),
    (["serve", "worker", "-c", HUGE], "CELERY_WORKER_AMOUNT"),
    (["serve", "worker", "--autoscale", f"{HUGE},1"], "CELERY_MAX_WORKERS"),
    (["serve", "worker", "-Q", NOT_UTF8], "CELERY_QUEUES"),
    (["serve", "api", "--state-dir", "x"], "--state-dir"),
    (["export", "systemd", "/proc/x"], "/proc/x"),
    (["export", "systemd", "a-file"], "a-file"),
    (["export", "systemd", "out" + NOT_UTF8], "not UTF-8"),
    (["export", "compose", "out", "--worker-grace", HUGE], "--worker-grace"),
    (["export", "supervisord", "out", "--grace", "0"], "--grace"),
    (["init", "/proc/x"], "/proc/x"),
    (["init", "a-file"], "a-file"),
    (["queues", "--timeout", "nan"], "--timeout"),
    (["queues", "--interval", HUGE], "--interval"),
    (["inspect", "ping", "--timeout", "1e400"], "--timeout"),
    (["inspect", NOT_UTF8], "METHOD"),
    (["doctor", "--stuck-minutes", HUGE], "DIFY_LOCAL_STUCK_DOCUMENT_MINUTES"),
    (["--project-dir", "/proc/no-such-folder", "config"], "--project-dir"),
    (["-e", "/proc", "config"], "/proc"),
    (["-s", "NOT_A_SETTING=1", "config"], "NOT_A_SETTING"),
    (["-s", "no-equals-sign", "config"], "NAME=VALUE"),
    (["no-such-command"], "no-such-command"),
    (["job"], "COMMAND"),
]


def one_line(done: subprocess.CompletedProcess) -> str:
    """The one line a failed command printed on stderr (nothing else), checked for a traceback."""
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dify-local: "), done.stderr
    return lines[0]


@pytest.fixture
def folder(project):
    """The project, with a file where a folder is asked for."""
    (project.dir / "a-file").write_text("not a folder\n")
    return project


@pytest.mark.parametrize("args, words", BAD_ARGUMENTS, ids=[" ".join(args) for args, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_one_line_and_exit_status_2(folder, args, words):
    done = folder.run(*args, timeout=60)
    line = one_line(done)
    assert done.returncode == 2, (done.returncode, line)
    assert words in line, line
    assert not (folder.dir / ".dify-local" / "metadata.db").exists()  # nothing started


def test_a_row_id_past_sqlite_integer_is_bad_input_with_a_database_there(project):
    """With a database to look in (where it overflowed SQLite's INTEGER with a traceback)."""
    assert project.run("migrate").returncode == 0
    for command in ("show", "retry"):
        done = project.run("failed", command, HUGE)
        line = one_line(done)
        assert done.returncode == 2 and "'ID'" in line and "9223372036854775807" in line, line


def wrong_value(setting) -> str:
    """A value each kind refuses; text settings refuse bytes that are not UTF-8."""
    return {"Integer": HUGE, "Boolean": "maybe", "PositiveNumber": "nan", "Choice": "no-such-choice",
            "NameList": "no_such_queue", "EmailList": "not-an-address", "MailSender": "<nobody",
            "BrokerUrl": "ftp://host", "BindAddress": "not an address!"}.get(type(setting.kind).__name__, NOT_UTF8)


@pytest.mark.parametrize("where", ["--set", "environment"])
def test_a_wrong_value_for_every_setting_is_one_line_naming_it(project, where):
    """All of them at once: each is named on a line of its own, exit status 2, nothing else printed."""
    assignments = {setting.name: wrong_value(setting) for setting in SETTINGS}
    if where == "--set":
        done = project.run(*[arg for name, value in assignments.items() for arg in ("-s", f"{name}={value}")],
                           "config")
    else:
        done = project.run("config", env=assignments)
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr, done.stderr
    lines = done.stderr.splitlines()
    for setting in SETTINGS:
        mine = [line for line in lines if line.startswith(f"dify-local: {setting.name}=")]
        assert len(mine) == 1 and "is not allowed" in mine[0], (setting.name, done.stderr)
    assert len(lines) == len(SETTINGS), done.stderr


# -- a state folder the user must repair ----------------------------------------------------------

def corrupt(project) -> Path:
    project.state.mkdir(parents=True, exist_ok=True)
    project.database.write_bytes(b"this is not a SQLite database\n" * 200)
    return project.database


@pytest.mark.parametrize("args", [["migrate"], ["failed"], ["failed", "show", "1"], ["job", "--", "true"],
                                  ["serve", "api"], ["serve", "worker"], ["serve", "beat"]],
                         ids=lambda args: " ".join(args))
def test_a_corrupt_database_is_one_line_saying_what_to_do(project, args):
    database = corrupt(project)
    done = project.run(*args, timeout=120)  # the roles open the database before they wait for a broker
    line = one_line(done)
    # a role says "only you can fix this" by its status (sysexits' EX_CONFIG): `up` does not restart it
    assert done.returncode == (EXIT_USER_MUST_FIX if args[0] == "serve" else 1), line
    assert f"the metadata database {database} is damaged or not a SQLite database" in line, line
    assert f"mv {database} {database}.broken" in line, line
    assert database.read_bytes() == b"this is not a SQLite database\n" * 200  # never "repaired" away


def test_a_database_that_is_a_folder_is_one_line(project):
    project.database.mkdir(parents=True)
    done = project.run("migrate")
    line = one_line(done)
    assert done.returncode == 1 and f"the metadata database {project.database} is a folder" in line, line


@pytest.mark.parametrize("reload", [True, False], ids=["reload", "no-reload"])
def test_a_corrupt_database_is_said_once_under_up_and_the_roles_are_not_restarted(project, reload):
    """api, worker and beat each say why once, and are marked failed (not backoff, no restart)
    while the broker keeps running; `ps` says so. With reload the role reports it on its channel,
    without, by its exit status."""
    corrupt(project)
    proc = project.start("up", *([] if reload else ["--no-reload"]))
    roles = ("api", "worker", "beat")
    for role in roles:
        proc.wait_for_line(rf"system \| {role} cannot start: the metadata database .* is damaged", timeout=120)

    def processes() -> dict:
        done = project.run("ps", "--json")
        return {row["name"]: row for row in json.loads(done.stdout)["processes"]} if done.returncode == 0 else {}

    # the roles fail at their database, before they wait for the broker: it may still be starting
    rows = wait_until(lambda: (rows := processes()) and rows["broker"]["status"] != "starting" and rows, 60,
                      "`ps` to answer with the broker past its start")
    assert [rows[role]["status"] for role in roles] == ["failed"] * 3, rows
    assert [rows[role]["restarts"] for role in roles] == [0] * 3, rows
    assert rows["broker"]["status"] == "ready", rows
    output = proc.output
    assert "Traceback" not in output, output
    for role in roles:
        assert output.count(f"{role} cannot start:") == 1, output
        assert output.count(f"system | {role} started (pid") == 1, output


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` made read-only for this user: mode 0500, or for root (who may write anything) the
    immutable attribute, which binds root too."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o500)
        try:
            yield
        finally:
            os.chmod(folder, 0o700)
        return
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make {folder} read-only for root here: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_read_only_state_folder_is_one_line(project):
    """`up` and `migrate` say which folder they cannot write and what to do."""
    project.state.mkdir(parents=True)
    with read_only(project.state):
        for args in (["migrate"], ["up"]):
            done = project.run(*args, timeout=120)
            line = one_line(done)
            assert done.returncode == 1, line
            assert str(project.state) in line and "writable by this user" in line, line
