"""JSON only: a pickled message is refused by the worker and never runs; JSON work goes on."""

from __future__ import annotations

import sqlite3

from runner.celery_app import create_celery_app
from runner.settings import load_settings
from tests.helpers import wait_until


def test_pickled_message_is_refused(project):
    project.serve_broker()
    worker = project.start("serve", "worker", "-Q", "ops_trace", "-c", "1")
    worker.wait_for_line(r"ready\.", timeout=60)
    client = create_celery_app(load_settings(project.dir, environ=project.env))
    client.conf.accept_content = ["json", "pickle"]  # a careless or hostile sender
    try:
        task = client.tasks["process_trace_tasks"]
        pickled = task.apply_async(args=["app-p", "pickled", {"x": 1}], serializer="pickle")
        plain = task.apply_async(args=["app-j", "plain", {"x": 1}], serializer="json")
        assert plain.get(timeout=60)["name"] == "plain"
        worker.wait_for_line(r"Refusing to deserialize untrusted content of type pickle", timeout=30)
        assert pickled.state == "PENDING"
    finally:
        client.close()

    def runs() -> set[str]:
        with sqlite3.connect(project.database) as db:
            return {row[0] for row in db.execute("SELECT id FROM task_runs WHERE finished_at IS NOT NULL")}

    wait_until(lambda: plain.id in runs(), 10, "the plain task's run to be recorded")
    assert pickled.id not in runs()
    with sqlite3.connect(project.database) as db:
        assert [row[0] for row in db.execute("SELECT name FROM traces")] == ["plain"]
