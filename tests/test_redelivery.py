"""A worker killed with -9: its unacknowledged tasks come back after the visibility timeout (derived
from the task time limit and the longest countdown, runner.broker_config), run again and finish."""

from __future__ import annotations

import json
import os
import signal
import sqlite3

from runner.broker_config import transport_options, visibility_timeout
from runner.celery_app import celery_config, create_celery_app
from runner.settings import load_settings
from tests.helpers import wait_until
from tests.test_supervisor import client, slow_worker, traces


def settings(tmp_path, **environ: str):
    return load_settings(tmp_path, environ={key: str(value) for key, value in environ.items()})


def test_the_visibility_timeout_follows_the_time_limit_and_the_longest_countdown(tmp_path):
    defaults = settings(tmp_path)
    assert visibility_timeout(defaults) == 300 + 600 + 60
    assert transport_options(defaults)["visibility_timeout"] == 960
    changed = settings(tmp_path, DIFY_LOCAL_TASK_TIME_LIMIT=100, DIFY_LOCAL_MAX_COUNTDOWN=20,
                       CELERY_WORKER_PREFETCH_MULTIPLIER=3)
    assert transport_options(changed)["visibility_timeout"] == 20 + 3 * 100 + 60
    config = celery_config(changed)
    assert config["broker_transport_options"]["visibility_timeout"] == 380
    assert "visibility_timeout" not in config["result_backend_transport_options"]  # consuming only
    assert config["task_time_limit"] == 100 and config["task_soft_time_limit"] == 90
    # kombu's sweep runs every few seconds and scans on each run (its default: about every 100 s)
    assert transport_options(changed)["unacked_restore_interval"] <= 2
    assert transport_options(changed)["unacked_restore_throttle"] == 1
    chosen = settings(tmp_path, DIFY_LOCAL_TASK_TIME_LIMIT=100, DIFY_LOCAL_VISIBILITY_TIMEOUT=7)
    assert transport_options(chosen)["visibility_timeout"] == 7


def test_config_shows_the_derived_visibility_timeout(project):
    shown = project.run("config", env={"DIFY_LOCAL_TASK_TIME_LIMIT": "40", "DIFY_LOCAL_MAX_COUNTDOWN": "10"})
    assert shown.returncode == 0, shown.stderr
    assert "visibility timeout: 110 s (derived: DIFY_LOCAL_MAX_COUNTDOWN +" in shown.stdout
    as_json = project.run("config", "--json", env={"DIFY_LOCAL_VISIBILITY_TIMEOUT": "9"})
    assert json.loads(as_json.stdout)["derived"]["visibility_timeout"] == 9


def test_a_task_of_a_worker_killed_with_9_runs_again_and_finishes(project, tmp_path):
    env = {**slow_worker(project, "-c 1"), "DIFY_LOCAL_VISIBILITY_TIMEOUT": "6"}
    project.up(env=env)
    app = client(project, env)
    folder = tmp_path / "runs"

    def row(task_id: str) -> dict | None:
        with sqlite3.connect(project.database) as db:
            db.row_factory = sqlite3.Row
            found = db.execute("SELECT state, attempts, worker FROM task_runs WHERE id = ?", [task_id]).fetchone()
        return dict(found) if found else None

    try:
        # shorter than the visibility timeout, so its second run is not delivered a third time
        sent = app.tasks["tests.sleep"].apply_async((4, str(folder), "once"), queue="dataset")
        wait_until(lambda: (row(sent.id) or {}).get("state") == "STARTED", 30, "the task to start")
        killed = project.processes()["worker"]["pid"]
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: project.processes()["worker"]["pid"] != killed, 30, "up to restart the worker")
        # kombu's default visibility timeout would keep it away for an hour
        assert sent.get(timeout=60) == "once"
    finally:
        app.close()
    assert traces(folder) == ["once"]  # the killed run never finished; the second did
    wait_until(lambda: row(sent.id)["state"] == "SUCCESS", 10, "its row to be written")
    assert row(sent.id)["attempts"] == 2


def test_a_task_whose_arguments_sqlite_cannot_encode_costs_no_other_row(project):
    """Sent by Celery itself (the API refuses a lone surrogate with a 400): its row and its
    neighbours' rows, recorded by the sender and by the worker in the same batches, are all kept."""
    project.up()
    app = create_celery_app(load_settings(project.dir, environ=project.env))
    try:
        odd = app.send_task("send_mail_task", args=["a@example.com", "odd \ud800", "body"])
        neighbours = [app.send_task("send_mail_task", args=["a@example.com", f"n{n}", "body"]) for n in range(10)]
        sent = [odd, *neighbours]
        wait_until(lambda: all(result.state in ("SUCCESS", "FAILURE") for result in sent), 60, "the tasks to finish")
    finally:
        app.close()

    def rows() -> dict[str, tuple]:
        with sqlite3.connect(project.database) as db:
            return {row[0]: row[1:] for row in db.execute("SELECT id, state, args FROM task_runs")}
    wait_until(lambda: all(rows().get(result.id, ("",))[0] == result.state for result in sent), 10,
               "every row to say how its task ended")
    assert json.loads(rows()[odd.id][1])[1] == "odd \ud800"
