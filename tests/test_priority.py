"""The seed's priority classes are real: with backlogs waiting, one worker (concurrency 1,
prefetch 1) serves every high-priority task before any normal one, and retention after the normal
queues, whatever order its -Q lists them in."""

from __future__ import annotations

import sqlite3

from runner.settings import load_settings
from tests.helpers import wait_until


def _client(project):
    from runner.celery_app import create_celery_app

    settings = load_settings(project.dir, environ=project.env)
    return create_celery_app(settings)


def _backlog(project, plan: list[tuple[str, list, int]]) -> dict[str, set[str]]:
    """Send `count` of each task with no worker running; returns the ids sent per task."""
    app = _client(project)
    sent: dict[str, set[str]] = {}
    try:
        for task, args, count in plan:
            sent[task] = {app.tasks[task].apply_async(args=args).id for _ in range(count)}
    finally:
        app.close()
    return sent


def _run_order(project, total: int) -> list[str]:
    def finished():
        with sqlite3.connect(project.database) as db:
            done = db.execute("SELECT COUNT(*) FROM task_runs WHERE state = 'SUCCESS'").fetchone()[0]
        return done >= total
    wait_until(finished, 240, f"{total} tasks to finish", interval=0.5)
    with sqlite3.connect(project.database) as db:
        return [row[0] for row in db.execute(
            "SELECT queue FROM task_runs WHERE started_at IS NOT NULL ORDER BY started_at")]


def _worker(project, queues: str):
    return project.start("serve", "worker", "-Q", queues, "-c", "1", "--prefetch-multiplier", "1")


def test_priority_dataset_backlog_is_served_before_dataset(project):
    project.serve_broker()
    assert project.run("migrate").returncode == 0
    _backlog(project, [
        ("document_indexing_task", ["kb", "normal.txt", "normal priority text"], 200),
        ("priority_document_indexing_task", ["kb", "urgent.txt", "user triggered text"], 200),
    ])
    worker = _worker(project, "dataset,priority_dataset")  # normal queue named first on purpose
    order = _run_order(project, 400)
    assert len(order) == 400, worker.output
    assert order == ["priority_dataset"] * 200 + ["dataset"] * 200, (
        f"first dataset task at position {order.index('dataset')}; "
        f"last priority_dataset task at position {len(order) - 1 - order[::-1].index('priority_dataset')}")


def test_retention_is_served_after_the_normal_queues(project):
    project.serve_broker()
    assert project.run("migrate").returncode == 0
    _backlog(project, [
        ("clean_task_runs_task", [30], 60),
        ("rag_pipeline_run_task", ["some text to chunk"], 60),
        ("send_mail_task", ["ops@example.com", "note", "body"], 60),
    ])
    worker = _worker(project, "retention,mail,pipeline")
    order = _run_order(project, 180)
    assert len(order) == 180, worker.output
    assert order[-60:] == ["retention"] * 60, f"first retention task at position {order.index('retention')}"
    assert set(order[:120]) == {"mail", "pipeline"}
