"""A prefork worker (tasks run in forked children) records its task runs like a threads one."""

from __future__ import annotations

import sqlite3

from runner.celery_app import create_celery_app
from runner.settings import load_settings
from tests.helpers import wait_until


def test_prefork_children_record_task_runs(project):
    project.serve_broker()
    worker = project.start("serve", "worker", "-P", "prefork", "-c", "2", "-Q", "pipeline")
    worker.wait_for_line(r"ready\.", timeout=60)
    client = create_celery_app(load_settings(project.dir, environ=project.env))
    try:
        results = [client.tasks["rag_pipeline_run_task"].delay(f"text {n}") for n in range(6)]
        assert [r.get(timeout=60)["chunks"] for r in results] == [[f"text {n}"] for n in range(6)]
    finally:
        client.close()

    def recorded() -> int:
        with sqlite3.connect(project.database) as db:
            return db.execute("SELECT COUNT(*) FROM task_runs WHERE state = 'SUCCESS' AND runtime >= 0").fetchone()[0]
    wait_until(lambda: recorded() == 6, 15, "six recorded runs from the prefork children")
