"""The seed's run modes: MODE selects the role, migrate/upgrade-db, job runs inside the app context."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import sqlite_utils

from runner.errors import EXIT_USER_MUST_FIX
from runner.store.migrations import migrations
from tests.helpers import BIN, port_open, wait_until

# every migration, in order (issues add theirs at the end): all of them are pending on an empty database
MIGRATIONS = [migration.name for migration in migrations.pending(sqlite_utils.Database(memory=True))]


def test_mode_selects_the_role(project):
    broker = project.start("serve", env={"MODE": "broker"})
    wait_until(lambda: port_open(project.broker_port), 20, "MODE=broker to listen")
    assert "embedded broker" in broker.wait_for_line("listening on").string
    result = project.run("serve")
    assert result.returncode == 2 and "name a role" in result.stderr


def test_migrate_then_current(project):
    first = project.run("migrate")
    assert first.returncode == 0 and f"applied {len(MIGRATIONS)} migration(s)" in first.stdout
    assert first.stdout.rstrip().endswith(", ".join(MIGRATIONS))
    again = project.run("migrate")
    assert again.returncode == 0 and f"is current ({len(MIGRATIONS)} migrations applied)" in again.stdout
    with sqlite3.connect(project.database) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_api_refuses_an_old_schema_when_migrations_are_off(project):
    project.state.mkdir()
    sqlite3.connect(project.database).close()  # an empty database: no migrations applied
    project.serve_broker()
    result = project.run("serve", "api", env={"MIGRATION_ENABLED": "false"}, timeout=30)
    assert result.returncode == EXIT_USER_MUST_FIX  # `up` does not restart it: a restart changes nothing
    assert f"lacks migration(s) {', '.join(MIGRATIONS)} and MIGRATION_ENABLED=false" in result.stderr
    assert "Traceback" not in result.stderr


def test_job_runs_a_command_in_the_app_context(project):
    code = ("import os, sqlite3; print(os.environ['CELERY_BROKER_URL']); print(os.environ['MODE']); "
            "print(sqlite3.connect(os.environ['DIFY_LOCAL_STATE_DIR'] + '/metadata.db')"
            ".execute('select count(*) from task_runs').fetchone()[0])")
    result = project.run("job", "--", sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [project.broker_url, "job", "0"]
    failing = project.run("job", "--", sys.executable, "-c", "raise SystemExit(7)")
    assert failing.returncode == 7
    missing = project.run("job", "--", "no-such-program-here")
    assert missing.returncode == 127 and "no such command" in missing.stderr


def test_celerys_own_cli_runs_the_app(project):
    project.serve_broker()
    worker = project.start(argv=[str(BIN / "celery"), "-A", "runner.app.celery", "worker", "-P", "threads",
                                 "-c", "1", "-Q", "mail", "-n", "plain@%h", "-l", "INFO"])
    worker.wait_for_line(r"ready\.", timeout=60)
    result = subprocess.run([str(BIN / "celery"), "-A", "runner.app.celery", "inspect", "active_queues", "--json"],
                            cwd=project.dir, env=project.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    queues = json.loads(result.stdout)
    assert [queue["name"] for queue in next(iter(queues.values()))] == ["mail"]


def test_local_config_typo_is_pointed_out(project):
    (project.dir / "local_config").mkdir()
    (project.dir / "local_config" / "local.env").write_text("CELERY_WORKR_AMOUNT=3\nDB_HOST=db\n")
    result = project.run("config")
    assert result.returncode == 0
    assert ("warning: local_config/local.env:1: CELERY_WORKR_AMOUNT is not a setting (ignored); "
            "did you mean CELERY_WORKER_AMOUNT?") in result.stderr
    assert "DB_HOST" not in result.stderr  # Dify's other settings are simply not ours
