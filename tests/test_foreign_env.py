"""`job` and `up` hand another project (a Procfile running none of our roles) only the broker's
address on top of what the user set: never our backend's settings, never our metadata database."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import wait_until

pytestmark = pytest.mark.processes

DUMP = '''
import json, os, sys, time
with open(sys.argv[1] + ".partial", "w") as out:
    json.dump(dict(os.environ), out)
os.replace(sys.argv[1] + ".partial", sys.argv[1])
if len(sys.argv) > 2:
    time.sleep(600)
'''
# ours, which a Dify app reads under the same names (MAIL_TYPE=outbox killed Dify's worker)
OUR_SETTINGS = ("MAIL_TYPE", "MODE", "CELERY_QUEUES", "CELERY_WORKER_AMOUNT", "LOG_LEVEL", "MIGRATION_ENABLED",
                "DIFY_LOCAL_STATE_DIR", "DIFY_LOCAL_PROJECT_DIR", "SQLALCHEMY_POOL_SIZE", "ENABLE_CLEAN_MESSAGES")


def another_project(project) -> None:
    (project.dir / "dump_env.py").write_text(DUMP)
    (project.dir / "Procfile").write_text(f"envdump: {sys.executable} dump_env.py seen.json wait\n")


def test_a_job_in_another_project_gets_the_broker_and_what_the_user_set_only(project):
    another_project(project)
    done = project.run("job", "--", sys.executable, "dump_env.py", "job.json", env={"LOG_LEVEL": "DEBUG"})
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads((project.dir / "job.json").read_text())
    assert [name for name in OUR_SETTINGS if name in seen] == ["LOG_LEVEL"]  # set by the user, so theirs
    assert seen["LOG_LEVEL"] == "DEBUG"
    assert seen["CELERY_BROKER_URL"] == project.broker_url and seen["REDIS_PASSWORD"] == project.broker_password
    assert seen["REDIS_PORT"] == str(project.broker_port)
    assert not any(path.exists() for path in (project.database, project.state / "metadata.db-wal"))


def test_our_own_backend_job_still_runs_in_our_context(project):
    """No Procfile: the built-in backend, whose job gets every setting, MODE=job and the database."""
    (project.dir / "dump_env.py").write_text(DUMP)
    done = project.run("job", "--", sys.executable, "dump_env.py", "job.json")
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads((project.dir / "job.json").read_text())
    assert (seen["MODE"], seen["MAIL_TYPE"]) == ("job", "outbox") and project.database.exists()


def test_a_line_of_another_project_under_up_gets_no_setting_of_ours(project):
    another_project(project)
    # our flags and --set configure dify-local; the project's line gets the broker's address
    stack = project.start("--set", "CELERY_WORKER_AMOUNT=3", "--set", "CELERY_QUEUES=mail",
                          "up", "envdump", "--state-dir", "state", env={"MODE": "api"})
    stack.wait_for_line(r"ready in [\d.]+ s", timeout=60)
    seen_file = project.dir / "seen.json"
    wait_until(seen_file.exists, 30, "the line to write its environment")
    seen = json.loads(seen_file.read_text())
    assert [name for name in OUR_SETTINGS if name in seen] == ["MODE"]  # the user's own environment, kept
    password = (project.dir / "state" / "broker-password").read_text().strip()
    assert seen["CELERY_BROKER_URL"] == f"redis://:{password}@127.0.0.1:{project.broker_port}/1"
    assert seen["REDIS_URL"].endswith(f"@127.0.0.1:{project.broker_port}/0") and seen["REDIS_PASSWORD"] == password
    assert "ready in" in stack.output
    assert not (project.dir / "state" / "metadata.db").exists()
