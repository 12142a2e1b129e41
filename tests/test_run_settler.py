"""Rows a killed worker's recorder left behind are settled from the result backend when a worker
starts (runner.run_settler); rows whose task may still run are left alone. A real broker, a real
SQLite file, a real worker."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime, timezone

from runner.broker_config import broker_connection, worker_heartbeat_key
from runner.celery_app import create_celery_app
from runner.settings import load_settings
from runner.store import prepare_database
from tests.helpers import wait_until


def message(task_id: str) -> dict:
    return {"body": "W1tdLCB7fSwge31d", "content-encoding": "utf-8", "content-type": "application/json",
            "headers": {"id": task_id, "task": "send_mail_task", "lang": "py"}, "properties": {}}


def test_rows_of_a_dead_worker_are_settled_from_the_backend_and_the_rest_left_alone(project):
    project.serve_broker()
    settings = load_settings(project.dir, environ=project.env)
    app = create_celery_app(settings)
    prepare_database(app.dify.database, migrate=True)
    now = time.time()

    def result(task_id: str, status: str, result, age: float = 60) -> None:
        done = datetime.fromtimestamp(now - age, timezone.utc).isoformat()
        app.backend.set(app.backend.get_key_for_task(task_id), app.backend.encode(
            {"status": status, "result": result, "traceback": None, "children": [], "date_done": done,
             "task_id": task_id}))

    rows = {  # id: (state, worker)
        "dead-success": ("STARTED", "gone@host"), "dead-failure": ("STARTED", "gone@host"),
        "never-started": ("PENDING", None), "no-result": ("STARTED", "gone@host"),
        "held": ("STARTED", "gone@host"), "queued": ("PENDING", None), "alive": ("STARTED", "other@host"),
        "just-finished": ("STARTED", "gone@host"),
    }
    with sqlite3.connect(project.database) as db:
        db.executemany("INSERT INTO task_runs (id, name, queue, state, worker, attempts, queued_at, started_at) "
                       "VALUES (?, 'send_mail_task', 'dataset', ?, ?, ?, ?, ?)",
                       [(task_id, state, worker, int(state == "STARTED"), now - 200,
                         now - 100 if state == "STARTED" else None) for task_id, (state, worker) in rows.items()])
    for task_id in ("dead-success", "never-started", "held", "queued", "alive"):
        result(task_id, "SUCCESS", "sent")
    result("dead-failure", "FAILURE", {"exc_type": "SMTPError", "exc_message": ["refused"], "exc_module": "x"})
    result("just-finished", "SUCCESS", "sent", age=0)  # its own worker's recorder may still write it
    with broker_connection(settings) as connection:
        client = connection.default_channel.client
        client.hset("unacked", "tag-1", json.dumps([message("held"), "", "dataset"]))  # a worker holds it
        client.lpush("dataset", json.dumps(message("queued")))  # waiting: the worker below does not consume it
        client.set(worker_heartbeat_key("other@host"), json.dumps({"node": "other@host"}), ex=60)
    app.close()

    worker = project.start("serve", "worker", "-Q", "mail")

    def states() -> dict[str, tuple]:
        with sqlite3.connect(project.database) as db:
            return {row[0]: row[1:] for row in db.execute(
                "SELECT id, state, finished_at, runtime, error, attempts FROM task_runs")}
    wait_until(lambda: states()["dead-failure"][0] == "FAILURE", 60, "the dead worker's rows to be settled")
    settled = states()
    assert settled["dead-success"][0] == "SUCCESS"
    assert abs(settled["dead-success"][1] - (now - 60)) < 1 and abs(settled["dead-success"][2] - 40) < 1
    assert settled["dead-failure"][3] == "SMTPError: refused"
    assert settled["never-started"][0] == "SUCCESS" and settled["never-started"][4] == 1  # it ran, once at least
    for task_id in ("no-result", "held", "alive", "just-finished"):
        assert settled[task_id][0] == "STARTED", task_id
    assert settled["queued"][0] == "PENDING"
    worker.wait_for_line(r"settled 3 task run\(s\)", 10)
