"""`dify-local doctor` on real processes: each check fails for its real cause, with its fix, and
passes once that cause is gone; a healthy stack is all green, on the embedded broker and on a real
Redis."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys

import sqlite_utils

from runner.store.migrations import migrations
from tests.helpers import wait_until

CHECKS = ["broker", "migrations", "consumers", "worker", "beat", "documents", "state", "ports"]
ALL_QUEUES_BUT = "dataset,priority_dataset"  # the partial worker's queues

# Listens on every port given and never accepts: a connection is made, nothing ever answers.
SILENT_LISTENER = """
import socket, sys, time
held = []
for port in sys.argv[1:]:
    s = socket.socket(); s.bind(("127.0.0.1", int(port))); s.listen(); held.append(s)
print("listening", flush=True)
time.sleep(600)
"""


def doctor(project, *args: str, env: dict | None = None) -> dict[str, dict]:
    """Run `doctor --json`: each check's result by name, after checking the exit status agrees."""
    result = project.run("doctor", "--json", *args, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 1), (result.returncode, result.stdout, result.stderr)
    report = json.loads(result.stdout)
    checks = {check["name"]: check for check in report["checks"]}
    assert list(checks) == CHECKS
    failed = any(check["status"] == "fail" for check in checks.values())
    assert report["ok"] is not failed and result.returncode == (1 if failed else 0), report
    for check in checks.values():
        assert check["status"] in ("pass", "fail", "warn", "skip"), check
        if check["status"] == "fail":
            assert check["fix"], check  # every failure says what to do
    return checks


def statuses(checks: dict[str, dict]) -> dict[str, str]:
    return {name: check["status"] for name, check in checks.items()}


def doctor_until(project, name: str, status: str, *args: str, timeout: float = 60, env: dict | None = None) -> dict:
    """Run doctor until check `name` has `status` (the stack settles in its own time)."""
    def reached():
        checks = doctor(project, *args, env=env)
        return checks if checks[name]["status"] == status else None
    return wait_until(reached, timeout, f"doctor's {name} check to {status}", interval=0.2)


def all_green(project, env: dict | None = None) -> dict:
    def green():
        checks = doctor(project, env=env)
        return checks if set(statuses(checks).values()) == {"pass"} else None
    return wait_until(green, 60, "every doctor check to pass", interval=0.2)


# -- nothing running ---------------------------------------------------------------------------------

def test_nothing_running_names_the_broker_and_the_database_with_their_fixes(project):
    checks = doctor(project)
    assert statuses(checks) == {"broker": "fail", "migrations": "fail", "consumers": "skip", "worker": "skip",
                                "beat": "skip", "documents": "skip", "state": "pass", "ports": "pass"}
    broker = checks["broker"]
    assert broker["data"]["kind"] == "unreachable" and "Connection refused" in broker["detail"]
    assert f"redis://:****@127.0.0.1:{project.broker_port}/1 (embedded)" in broker["detail"]
    assert "`dify-local up`" in broker["fix"]
    assert "no database yet" in checks["migrations"]["detail"] and "`dify-local migrate`" in checks["migrations"]["fix"]
    assert "the broker does not answer" in checks["worker"]["detail"]
    assert [entry["state"] for entry in checks["ports"]["data"]["ports"]] == ["free", "free"]
    # doctor made nothing but the folder's broker password (for the broker that starts next)
    assert [entry.name for entry in project.state.iterdir()] == ["broker-password"]

    text = project.run("doctor")
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    assert lines[0].startswith("✗ broker") and lines[1].startswith("✗ migrations")
    assert any(line.startswith("- worker") for line in lines)
    assert any(line.startswith("✓ ports") for line in lines)
    fixes = text.stdout.split("To fix:")[1]
    assert "broker" in fixes and "`dify-local migrate`" in fixes
    assert "2 passed, 2 failed, 4 skipped" in text.stdout


def test_a_database_missing_the_last_migration(project):
    names = [migration.name for migration in migrations.pending(sqlite_utils.Database(memory=True))]
    project.state.mkdir()
    db = sqlite_utils.Database(project.database)
    migrations.apply(db, stop_before=names[-1])
    db.close()
    check = doctor(project)["migrations"]
    assert check["status"] == "fail" and check["data"]["pending"] == [names[-1]]
    assert names[-1] in check["detail"] and check["fix"].startswith("`dify-local migrate`")

    assert project.run("migrate").returncode == 0
    check = doctor(project)["migrations"]
    assert check["status"] == "pass" and f"all {len(names)} migrations applied" in check["detail"]


def test_ports_held_by_another_program_are_named_with_its_pid(project):
    ports = [str(project.api_port), str(project.broker_port)]
    holder = project.start(argv=[sys.executable, "-c", SILENT_LISTENER, *ports])
    holder.wait_for_line("listening", timeout=20)
    checks = doctor(project)
    ports = checks["ports"]
    assert ports["status"] == "fail"
    assert f"API port {project.api_port} is held by another program" in ports["detail"]
    assert f"embedded broker port {project.broker_port} is held by another program" in ports["detail"]
    assert all(f"(pid {holder.popen.pid})" in line for line in ports["lines"]), ports["lines"]
    assert f"`kill {holder.popen.pid}`" in ports["fix"] and "DIFY_PORT" in ports["fix"] and "REDIS_PORT" in ports["fix"]
    # something listens on the broker's port and never answers: a timeout, not a refusal
    assert checks["broker"]["status"] == "fail" and checks["broker"]["data"]["kind"] == "timeout"
    assert "another program on that port" in checks["broker"]["fix"]

    holder.signal(signal.SIGKILL)
    holder.wait(20)
    checks = doctor(project)
    assert checks["ports"]["status"] == "pass"
    assert checks["broker"]["data"]["kind"] == "unreachable"


def test_the_state_folder_must_be_a_folder_with_room(project):
    free_mb = shutil.disk_usage(project.dir).free // 2**20
    check = doctor(project, env={"DIFY_LOCAL_MIN_FREE_MB": str(free_mb + 10**9)})["state"]
    assert check["status"] == "fail" and "below DIFY_LOCAL_MIN_FREE_MB" in check["detail"]
    assert "DIFY_LOCAL_STATE_DIR" in check["fix"]
    assert doctor(project)["state"]["status"] == "pass"

    (project.dir / "not-a-folder").write_text("")
    check = doctor(project, env={"DIFY_LOCAL_STATE_DIR": "not-a-folder"})["state"]
    assert check["status"] == "fail" and "is a file, not a folder" in check["detail"]


def test_bad_thresholds_are_refused_with_one_line(project):
    for value in ("abc", "0", "-3"):
        result = project.run("doctor", "--stuck-minutes", value)
        assert result.returncode == 2, result.stdout
        assert result.stderr.strip() == (
            f"dify-local: DIFY_LOCAL_STUCK_DOCUMENT_MINUTES={value!r} (command line (--stuck-minutes)) is not allowed: "
            "a number greater than 0 (minutes, e.g. 10 or 0.5)"), result.stderr


# -- the broker alone --------------------------------------------------------------------------------

def test_a_wrong_password_is_told_apart_and_a_broker_started_by_hand_is_ours(project):
    project.serve_broker()
    checks = doctor(project)
    assert checks["broker"]["status"] == "pass"
    broker_port = checks["ports"]["data"]["ports"][1]
    assert broker_port["state"] == "ours" and "not under `up`" in broker_port["description"]

    result = project.run("--set", "REDIS_PASSWORD=not-the-password", "doctor")
    assert result.returncode == 1 and "not-the-password" not in result.stdout
    checks = doctor(project, env={"REDIS_PASSWORD": "not-the-password"})
    broker = checks["broker"]
    assert broker["status"] == "fail" and broker["data"]["kind"] == "wrong password"
    assert f"redis://:****@127.0.0.1:{project.broker_port}/1" in broker["detail"]
    assert "REDIS_PASSWORD" in broker["fix"]
    assert {checks[name]["status"] for name in ("consumers", "worker", "beat")} == {"skip"}


def test_tls_mistakes_are_told_apart(project, redis_tls):
    checks = doctor(project, env={"CELERY_BROKER_URL": redis_tls.broker_url()})
    assert checks["broker"]["data"]["kind"] == "certificate" and "REDIS_SSL_CA_CERTS" in checks["broker"]["fix"]
    plain = redis_tls.broker_url().replace("rediss://", "redis://")
    checks = doctor(project, env={"CELERY_BROKER_URL": plain})
    assert checks["broker"]["status"] == "fail" and "rediss://" in checks["broker"]["fix"]
    checks = doctor(project, env={"CELERY_BROKER_URL": redis_tls.broker_url(), "REDIS_SSL_CA_CERTS": str(redis_tls.ca)})
    assert checks["broker"]["status"] == "pass"
    assert [entry["what"] for entry in checks["ports"]["data"]["ports"]] == ["API"]  # no embedded broker port


# -- whole stacks ------------------------------------------------------------------------------------

def process_pid(project, name: str) -> int:
    rows = json.loads(project.run("ps", "--json").stdout)["processes"]
    return next(row["pid"] for row in rows if row["name"] == name)


def test_a_healthy_stack_is_green_and_a_stopped_hung_or_doubled_role_is_named(project, tmp_path):
    project.up()
    checks = all_green(project)
    assert checks["ports"]["data"]["ports"][0]["state"] == "ours"
    assert "this project's `up`" in checks["ports"]["lines"][0]
    assert checks["worker"]["data"]["pinged"] == list(checks["worker"]["data"]["heartbeats"])
    text = project.run("doctor")
    assert text.returncode == 0 and "8 passed" in text.stdout and "To fix" not in text.stdout
    assert [line[0] for line in text.stdout.splitlines() if line and line[0] in "✓✗!-"] == ["✓"] * 8

    # beat stopped
    assert project.run("stop", "beat").returncode == 0
    beat = doctor(project)["beat"]
    assert beat["status"] == "fail" and "no beat is running" in beat["detail"]
    assert beat["fix"].startswith("`dify-local start beat`")
    assert project.run("start", "beat").returncode == 0
    doctor_until(project, "beat", "pass")

    # a second beat on the same broker (another folder's)
    stray = project.start("serve", "beat", env={"DIFY_LOCAL_STATE_DIR": str(tmp_path / "elsewhere"),
                                                "REDIS_PASSWORD": project.broker_password})  # that folder has its own
    beat = doctor_until(project, "beat", "fail")["beat"]
    assert "2 beats tick on this broker" in beat["detail"]
    assert f"`kill {stray.popen.pid}`" in beat["fix"] and "not this stack's beat" in beat["fix"]
    assert any(f"(pid {stray.popen.pid}): `dify-local serve beat` in {project.dir}" in line for line in beat["lines"])
    stray.signal(signal.SIGTERM)
    assert stray.wait(30) == 0
    assert doctor(project)["beat"]["status"] == "pass"  # a beat that stops takes its key with it

    # worker stopped
    assert project.run("stop", "worker").returncode == 0
    checks = doctor(project)
    assert checks["worker"]["status"] == "fail" and "no worker answers a ping" in checks["worker"]["detail"]
    assert checks["worker"]["fix"] == "`dify-local start worker`"
    assert checks["consumers"]["status"] == "skip"
    assert project.run("start", "worker").returncode == 0
    doctor_until(project, "worker", "pass")

    # worker hung (stopped by a signal): its heartbeat is there, its answer is not
    pid = process_pid(project, "worker")
    os.kill(pid, signal.SIGSTOP)
    try:
        worker = doctor(project)["worker"]
        assert worker["status"] == "fail" and any("no answer to a ping" in line or "answers no ping" in line
                                                  for line in worker["lines"]), worker
        assert "`dify-local restart worker`" in worker["fix"]
    finally:
        os.kill(pid, signal.SIGCONT)
    doctor_until(project, "worker", "pass")


def test_a_queue_without_consumer_and_the_document_it_strands(project):
    project.up("broker", "api", "beat")  # `up` refuses a Procfile that leaves routed queues unconsumed
    project.start("serve", "worker", "-Q", ALL_QUEUES_BUT)
    consumers = doctor_until(project, "consumers", "fail")["consumers"]
    unconsumed = consumers["data"]["unconsumed"]
    assert "dataset" not in unconsumed and "priority_dataset" not in unconsumed
    assert "send_mail_task" in unconsumed["mail"] and "priority_pipeline" in unconsumed
    assert any(line.startswith("mail: send_mail_task") for line in consumers["lines"])
    assert "`dify-local serve worker -Q priority_pipeline," in consumers["fix"]

    # an upload waits on priority_pipeline, which nobody consumes
    status, dataset = project.api.post("/v1/datasets", {"name": "handbook"})
    assert status == 201, dataset
    status, body = project.api.post(f"/v1/datasets/{dataset['id']}/documents",
                                    {"name": "stranded.txt", "text": "Refunds are paid within thirty days."})
    assert status == 202, body
    document_id = body["document"]["id"]
    assert doctor(project)["documents"]["status"] == "pass"  # waiting for seconds is not stuck
    documents = doctor_until(project, "documents", "fail", "--stuck-minutes", "0.01")["documents"]
    assert documents["data"]["stuck"] == 1
    line, = documents["lines"]
    assert line.startswith(f"stranded.txt ({document_id}) in dataset handbook ({dataset['id']}): waiting for ")
    assert "priority_pipeline" in documents["fix"]

    missing = ",".join(unconsumed)
    project.start("serve", "worker", "-n", "rest@%h", "-Q", missing)
    consumers = doctor_until(project, "consumers", "pass")["consumers"]
    assert sorted(consumers["data"]["consumers"]["mail"])[0].startswith("rest@")
    wait_until(lambda: project.api.get(f"/v1/datasets/{dataset['id']}/documents/{document_id}")[1]["status"]
               == "completed", 60, "the stranded document to complete")
    assert doctor(project, "--stuck-minutes", "0.01")["documents"]["status"] == "pass"


def test_a_stack_on_a_real_redis_is_green(project, redis_server):
    env = {"CELERY_BROKER_URL": f"{redis_server}/1"}
    project.up(env=env)
    checks = all_green(project, env=env)
    assert "(external)" in checks["broker"]["detail"]
    assert project.run("stop", "worker").returncode == 0
    worker = doctor(project, env=env)["worker"]
    assert worker["status"] == "fail" and "none has beaten" in worker["detail"]  # the stop removed its key

    wrong = redis_server.replace(":realredispw@", ":nope@")
    assert doctor(project, env={"CELERY_BROKER_URL": f"{wrong}/1"})["broker"]["data"]["kind"] == "wrong password"
    bare = redis_server.replace(":realredispw@", "")
    broker = doctor(project, env={"CELERY_BROKER_URL": f"{bare}/1"})["broker"]
    assert broker["data"]["kind"] == "no password" and "CELERY_BROKER_URL" in broker["fix"]

