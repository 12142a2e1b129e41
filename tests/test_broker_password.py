"""The embedded broker's password: Dify's published difyai123456 is known to every user of the
machine (loopback is reachable by all of them), so when the user sets none a random one is made
per state folder, kept there owner-only, and every command and process finds it there. A password
the user sets is used as it is."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import threading
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.helpers import wait_until

PUBLISHED = "difyai123456"
NO_RETRY = Retry(NoBackoff(), 0)  # redis-py retries an AuthenticationError (a ConnectionError) by default


def password_file(project) -> Path:
    return project.state / "broker-password"


def refused(port: int, password: str) -> bool:
    """The broker answers AUTH with this password as Redis does a wrong one (WRONGPASS)."""
    try:
        redis.Redis(port=port, password=password, retry=NO_RETRY).ping()
    except redis.AuthenticationError as error:
        return "WRONGPASS" in str(error) or "invalid username-password" in str(error)
    return False


def stop(proc) -> None:
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 0, proc.output


def shown_config(project, *args: str, env: dict | None = None) -> dict[str, tuple[str, str]]:
    done = project.run(*args, "config", "--show-secrets", "--json", env=env)
    assert done.returncode == 0, done.stderr
    return {item["name"]: (item["value"], item["source"]) for item in json.loads(done.stdout)["settings"]}


def make_password(project, env: dict | None = None) -> str:
    """What starts the stack or a role of it makes the folder's password: here a `job`."""
    done = project.run("job", "--", "true", env=env)
    assert done.returncode == 0, done.stderr
    return shown_config(project, env=env)["REDIS_PASSWORD"][0]


def one_line_error(done, status: int, *needles: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == status and len(lines) == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stdout + done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_with_no_password_set_the_broker_gets_a_random_one_kept_owner_only_and_stable(project):
    proc = project.serve_broker()
    path = password_file(project)
    facts = os.lstat(path)
    assert stat.S_ISREG(facts.st_mode) and stat.S_IMODE(facts.st_mode) == 0o600 and facts.st_uid == os.geteuid()
    password = path.read_text().strip()
    assert password != PUBLISHED and len(password) >= 32
    assert refused(project.broker_port, PUBLISHED)
    client = redis.Redis(port=project.broker_port, password=password, db=1)
    assert client.set("kept", "yes")
    assert password not in proc.output  # the start line masks it
    stop(proc)
    assert [entry.name for entry in project.state.iterdir() if entry.name.startswith(".broker-password")] == []

    proc = project.serve_broker()  # started again: the same password, and the data with it
    assert path.read_text().strip() == password
    assert redis.Redis(port=project.broker_port, password=password, db=1).get("kept") == b"yes"
    assert refused(project.broker_port, PUBLISHED)
    source = shown_config(project)["REDIS_PASSWORD"]
    assert source == (password, f"generated, {path}")
    masked = project.run("config")
    assert f"generated, {path}" in masked.stdout and password not in masked.stdout
    stop(proc)


def test_each_state_folder_has_its_own_password_and_a_real_broker_needs_none(project, tmp_path):
    # a command that only looks makes nothing: none before a command starts or reaches the broker
    assert shown_config(project)["REDIS_PASSWORD"] == (
        "", f"generated, {password_file(project)} (none yet: made when the broker first starts or is first reached)")
    assert not project.state.exists()
    elsewhere = {"DIFY_LOCAL_STATE_DIR": str(tmp_path / "other-state")}
    make_password(project)
    # a client of the broker makes it too (here with no broker to answer), for the broker that starts next
    assert project.run("queues", env=elsewhere).returncode == 1
    first = shown_config(project)["REDIS_PASSWORD"]
    other = shown_config(project, env=elsewhere)["REDIS_PASSWORD"]
    assert first[1] == f"generated, {password_file(project)}"
    assert other[1] == f"generated, {tmp_path / 'other-state' / 'broker-password'}"
    assert first[0] != other[0] and PUBLISHED not in (first[0], other[0])
    assert shown_config(project)["REDIS_PASSWORD"] == first  # read again, not made again
    # with CELERY_BROKER_URL there is no embedded broker: nothing is generated for it
    real = {"CELERY_BROKER_URL": "redis://:theirs@127.0.0.1:6390/1", "DIFY_LOCAL_STATE_DIR": str(tmp_path / "real")}
    assert project.run("job", "--", "true", env=real).returncode == 0
    assert shown_config(project, env=real)["REDIS_PASSWORD"][0] == ""
    assert shown_config(project, env=real)["REDIS_PASSWORD"][1].startswith("default")
    assert not (tmp_path / "real" / "broker-password").exists()


def test_concurrent_first_uses_agree_on_one_password(tmp_path):
    """Commands and processes starting at once (honcho starts the four roles together) each make
    the password if it is missing: one wins, and none reads a half-written file."""
    from runner.settings.generated import broker_password

    def first_use(path: Path, barrier: threading.Barrier, seen: list, errors: list) -> None:
        barrier.wait()
        try:
            seen.append(broker_password(path))
        except BaseException as error:  # reported below
            errors.append(error)

    for round_number in range(20):
        path = tmp_path / f"state-{round_number}" / "broker-password"
        barrier = threading.Barrier(8)
        seen: list[str] = []
        errors: list[BaseException] = []
        threads = [threading.Thread(target=first_use, args=(path, barrier, seen, errors)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert errors == [] and len(seen) == 8 and len(set(seen)) == 1, (errors, seen)
        assert sorted(entry.name for entry in path.parent.iterdir()) == ["broker-password"]


def test_every_command_in_another_terminal_works_without_being_told_the_password(project):
    stack = project.up()
    password = project.broker_password  # as the user finds it: in the state folder
    assert password != PUBLISHED and refused(project.broker_port, PUBLISHED)
    assert password not in stack.output
    assert password not in (project.state / "supervisor.json").read_text()  # the commands read it from its file
    # the api and worker that `up` started got it: a task goes through both
    status, sent = project.api.post("/v1/tasks/rag_pipeline_run_task", {"args": ["password"]})
    assert status == 202, sent
    wait_until(lambda: project.api.get(sent["poll"])[1]["state"] == "SUCCESS", 60, "the task to run")
    for command in (["broker", "info"], ["queues"], ["inspect", "ping", "--timeout", "10"], ["ps"],
                    ["purge", "dataset", "--yes"], ["config"]):
        done = project.run(*command)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert password not in done.stdout + done.stderr and "Traceback" not in done.stderr, command
    doctor = project.run("doctor", "--json")
    broker = {check["name"]: check for check in json.loads(doctor.stdout)["checks"]}["broker"]
    assert broker["status"] == "pass", broker
    job = project.run("job", "--", sys.executable, "-c",
                      "import os, redis; print(redis.Redis.from_url(os.environ['CELERY_BROKER_URL']).ping())")
    assert job.returncode == 0 and job.stdout.strip() == "True", job.stdout + job.stderr


PROBE = '''
import json, os, redis, sys, time
env = os.environ
answers = {
    "REDIS_PASSWORD": env.get("REDIS_PASSWORD"),
    "REDIS_URL": redis.Redis.from_url(env["REDIS_URL"]).ping(),
    "CELERY_BROKER_URL": redis.Redis.from_url(env["CELERY_BROKER_URL"]).ping(),
    # as Dify's own config connects: host, port and password apart
    "host, port, password": redis.Redis(host=env["REDIS_HOST"], port=int(env["REDIS_PORT"]),
                                        password=env["REDIS_PASSWORD"]).ping(),
}
with open(sys.argv[1] + ".partial", "w") as out:
    json.dump(answers, out)
os.replace(sys.argv[1] + ".partial", sys.argv[1])
time.sleep(600)
'''


@pytest.mark.parametrize("flags", [[], ["--broker-password", PUBLISHED]], ids=["generated", "--broker-password"])
def test_a_foreign_procfile_process_gets_the_password_in_its_environment(project, flags):
    (project.dir / "probe.py").write_text(PROBE)
    answers = project.dir / "answers.json"
    (project.dir / "Procfile").write_text(f"probe: {sys.executable} probe.py {answers}\n")
    stack = project.up(*flags, env={"REDIS_HOST": "127.0.0.1"})
    wait_until(answers.exists, 60, "the probe to connect to the broker")
    expected = flags[1] if flags else project.broker_password
    assert json.loads(answers.read_text()) == {"REDIS_PASSWORD": expected, "REDIS_URL": True,
                                               "CELERY_BROKER_URL": True, "host, port, password": True}
    if flags:  # a password given is used as it is, even the published one (on loopback, the user's choice)
        assert not password_file(project).exists()
    else:
        assert refused(project.broker_port, PUBLISHED)
    assert expected not in stack.output


@pytest.mark.parametrize("where", ["environment", ".env", "local_config", "--password", "--set"])
def test_a_password_the_user_sets_is_used_as_it_is(project, where):
    generated = make_password(project)  # the folder has one already
    env, args, before = {}, [], []
    if where == "environment":
        password, env = PUBLISHED, {"REDIS_PASSWORD": PUBLISHED}  # Dify's .env.example sets it
    elif where == ".env":
        password = PUBLISHED
        (project.dir / ".env").write_text(f"REDIS_PASSWORD={password}\n")
    elif where == "local_config":
        password = "from-local-config"
        (project.dir / "local_config").mkdir()
        (project.dir / "local_config" / "local.env").write_text(f"REDIS_PASSWORD={password}\n")
    elif where == "--password":
        password, args = "from-the-flag", ["--password", "from-the-flag"]
    else:
        password, before = "from-set", ["--set", "REDIS_PASSWORD=from-set"]
    proc = project.start(*before, "serve", "broker", *args, env=env)
    proc.wait_for_line(r"listening on redis://:\*\*\*\*@127\.0\.0\.1", timeout=60)
    assert redis.Redis(port=project.broker_port, password=password).ping()
    assert refused(project.broker_port, generated)
    assert password_file(project).read_text().strip() == generated  # kept, for when none is set again
    if where != "--password":  # (a flag of `serve broker` only)
        assert shown_config(project, *before, env=env)["REDIS_PASSWORD"][0] == password
    stop(proc)


def test_no_password_still_lets_clients_in_on_loopback(project):
    proc = project.start("serve", "broker", "--no-password")
    proc.wait_for_line(rf"listening on redis://127\.0\.0\.1:{project.broker_port}", timeout=60)
    assert redis.Redis(port=project.broker_port).ping()
    stop(proc)


def test_a_broker_started_by_hand_beside_a_broker_url_says_it_has_no_password(project):
    """CELERY_BROKER_URL names the broker, so nothing is generated; a broker started by hand then
    has no password to require, which it says instead of letting everyone in."""
    done = project.run("serve", "broker", env={"CELERY_BROKER_URL": f"redis://:x@127.0.0.1:{project.broker_port}/1"})
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert "the embedded broker has no password to require" in done.stdout + done.stderr
    assert "REDIS_PASSWORD" in done.stdout + done.stderr and "--no-password" in done.stdout + done.stderr


def _private(content: bytes):
    """A file of ours, owner-only, holding `content`: only what is in it is wrong."""
    def make(path: Path, outside: Path) -> None:
        path.write_bytes(content)
        path.chmod(0o600)
    return make


def _symlink_elsewhere(path: Path, outside: Path) -> None:
    outside.write_text("a-password-someone-else-chose-1234\n")
    outside.chmod(0o600)
    path.symlink_to(outside)


def _readable_by_others(path: Path, outside: Path) -> None:
    path.write_text("x" * 40 + "\n")
    path.chmod(0o644)


NOT_A_PASSWORD = "does not hold a broker password"
BAD_FILES = {
    "empty": (_private(b""), NOT_A_PASSWORD),
    "too short": (_private(b"abc\n"), NOT_A_PASSWORD),
    "two lines": (_private(b"a" * 20 + b"\n" + b"b" * 20 + b"\n"), NOT_A_PASSWORD),
    "binary": (_private(bytes(range(256))), NOT_A_PASSWORD),
    "huge": (_private(b"a" * 1_000_000), NOT_A_PASSWORD),
    "readable by others": (_readable_by_others, "may be read or changed by other users (mode 0644)"),
    "a symlink": (_symlink_elsewhere, "is a symbolic link"),
    "a folder": (lambda path, outside: path.mkdir(), "is not a file"),
    "a fifo": (lambda path, outside: os.mkfifo(path, 0o600), "is not a file"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_password_file_is_one_clear_line(project, tmp_path, case):
    make, says = BAD_FILES[case]
    project.state.mkdir(mode=0o700)
    path, outside = password_file(project), tmp_path / "outside"
    make(path, outside)
    for command in (["broker", "info"], ["serve", "broker"], ["up"]):
        done = project.run(*command, timeout=60)
        one_line_error(done, 2, str(path), says, "delete it")
    if case == "a symlink":  # neither read nor changed through the link
        assert outside.read_text() == "a-password-someone-else-chose-1234\n"
        assert "someone-else" not in done.stdout + done.stderr


def test_a_password_file_of_another_user_is_refused(project):
    if os.geteuid() != 0:
        pytest.skip("needs root, to give the file to another user")
    project.state.mkdir(mode=0o700)
    path = password_file(project)
    path.write_text("y" * 40 + "\n")
    path.chmod(0o600)
    os.chown(path, 12345, 12345)
    one_line_error(project.run("queues"), 2, str(path), "belongs to another user (uid 12345)", "delete it")


def test_exported_units_do_not_carry_the_generated_password(project, tmp_path):
    password = make_password(project)
    for format_name in ("systemd", "supervisord", "compose"):
        folder = tmp_path / format_name
        done = project.run("export", format_name, str(folder))
        assert done.returncode == 0, done.stderr
        for written in folder.iterdir():
            assert password not in written.read_text(), written
