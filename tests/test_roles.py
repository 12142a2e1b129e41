"""The seed's run modes: MODE selects the role, migrate/upgrade-db, job runs inside the app context."""

from __future__ import annotations

import sqlite3
import sys

from tests.helpers import port_open, wait_until


def test_mode_selects_the_role(project):
    broker = project.start("serve", env={"MODE": "broker"})
    wait_until(lambda: port_open(project.broker_port), 20, "MODE=broker to listen")
    assert "embedded broker" in broker.wait_for_line("listening on").string
    result = project.run("serve")
    assert result.returncode == 2 and "name a role" in result.stderr


def test_migrate_then_current(project):
    first = project.run("migrate")
    assert first.returncode == 0 and "applied 2 migration(s)" in first.stdout
    again = project.run("migrate")
    assert again.returncode == 0 and "is current (2 migrations applied)" in again.stdout
    with sqlite3.connect(project.database) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_api_refuses_an_old_schema_when_migrations_are_off(project):
    project.state.mkdir()
    sqlite3.connect(project.database).close()  # an empty database: no migrations applied
    project.serve_broker()
    result = project.run("serve", "api", env={"MIGRATION_ENABLED": "false"}, timeout=30)
    assert result.returncode == 1
    assert "lacks migration(s) 0001_task_runs, 0002_domain and MIGRATION_ENABLED=false" in result.stderr
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
