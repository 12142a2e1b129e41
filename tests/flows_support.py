"""Shared by the workflow, app and plugin tests: sending through the API and waiting for results."""

from __future__ import annotations

import sqlite3
from typing import Any

from tests.helpers import wait_until

GREETING = {
    "nodes": [{"id": "start", "type": "start", "variables": ["name"]},
              {"id": "greet", "type": "template", "template": "Hello {{ name }}", "output": "greeting"},
              {"id": "end", "type": "end", "outputs": ["greeting"]}],
    "edges": [{"source": "start", "target": "greet"}, {"source": "greet", "target": "end"}],
}


def accepted(answer: tuple[int, Any]) -> dict:
    status, body = answer
    assert status == 202, body
    return body


def task_result(project, poll: str, timeout: float = 60) -> Any:
    """The result of a sent task, once it succeeded (a failure fails the test with its error)."""
    def finished():
        status, body = project.api.get(poll)
        assert status == 200, body
        assert body["state"] != "FAILURE", body
        return body if body["state"] == "SUCCESS" else None
    return wait_until(finished, timeout, f"the task at {poll} to succeed")["result"]


def run_task(project, task: str, *args, **kwargs) -> Any:
    sent = accepted(project.api.post(f"/v1/tasks/{task}", {"args": list(args), "kwargs": kwargs}))
    return task_result(project, sent["poll"])


def rows(project, sql: str, params: tuple = ()) -> list[tuple]:
    with sqlite3.connect(project.database) as db:
        return db.execute(sql, params).fetchall()


def run_with_log(project, run_id: str, timeout: float = 30) -> dict:
    """GET /v1/workflow-runs/<id> once workflow_storage has written its log."""
    def logged():
        status, body = project.api.get(f"/v1/workflow-runs/{run_id}")
        assert status == 200, body
        return body if body["log_path"] else None
    return wait_until(logged, timeout, f"the run log of {run_id}")
