"""Failure handling through a running stack: retries with backoff, dead letters in failed_tasks,
`dify-local failed` listing, showing and sending one again."""

from __future__ import annotations

import json

from runner.celery_app import create_celery_app
from runner.settings import load_settings
from tests.helpers import REPO, wait_until

STACK = "broker: dify-local serve broker\napi: dify-local serve api\nbeat: dify-local serve beat\n"


def failed(project, *args: str) -> list[dict]:
    result = project.run("failed", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["failed"]


def test_a_failing_task_lands_in_failed_tasks_and_succeeds_on_retry(project):
    (project.dir / "Procfile").write_text(STACK + "worker: dify-local serve worker -I tests.support.flaky_tasks\n")
    env = {"PYTHONPATH": str(REPO)}
    project.up(env=env)
    import tests.support.flaky_tasks  # noqa: F401  (registers tests.flaky with the client)

    client = create_celery_app(load_settings(project.dir, environ={**project.env, **env}), register_tasks=False)
    flag = project.dir / "flag"
    sent = client.send_task("tests.flaky", args=[str(flag)], queue="mail")

    rows = wait_until(lambda: [row for row in failed(project) if row["task_id"] == sent.id], 60,
                      "the flaky task to land in failed tasks after its retries")
    row = rows[0]
    assert row["name"] == "tests.flaky" and row["queue"] == "mail"
    assert row["retries"] == 2  # the first run and two retries with backoff
    assert row["args"] == [str(flag)] and row["kwargs"] == {}
    assert "RuntimeError" in row["error"] and "attempt 3" in row["error"]
    assert row["retried_at"] is None

    listed = project.run("failed")
    assert listed.returncode == 0 and "tests.flaky" in listed.stdout and "RuntimeError" in listed.stdout
    shown = project.run("failed", "show", str(row["id"]))
    assert shown.returncode == 0, shown.stderr
    assert "Traceback" in shown.stdout and "flaky_tasks.py" in shown.stdout and str(flag) in shown.stdout

    flag.write_text("there now")
    retried = project.run("failed", "retry", str(row["id"]))
    assert retried.returncode == 0, retried.stderr
    new_id = retried.stdout.split("task id ")[1].split()[0]
    assert new_id != sent.id
    status, body = wait_until(lambda: (lambda got: got if got[1]["state"] == "SUCCESS" else None)(
        project.api.get(f"/v1/tasks/{new_id}")), 30, "the retried task to succeed")
    assert body["result"] == "there now" and body["name"] == "tests.flaky"
    again = [r for r in failed(project) if r["id"] == row["id"]][0]
    assert again["retry_task_id"] == new_id and again["retried_at"] is not None
    assert not [r for r in failed(project, "--pending") if r["id"] == row["id"]]

    # every attempt is in the task's metrics: two retried, one failed for good, one succeeded
    def metrics():
        tasks = project.api.get("/v1/metrics?task=tests.flaky")[1]["tasks"]
        return tasks if tasks and tasks[0]["finished"] == 4 else None
    flaky, = wait_until(metrics, 10, "the metrics of tests.flaky")
    assert (flaky["retried"], flaky["failed"], flaky["succeeded"]) == (2, 1, 1)


def test_a_real_task_with_bad_input_fails_at_once_without_retries(project):
    stack = project.up()
    status, body = project.api.post("/v1/tasks/document_indexing_update_task", {"args": ["no-such-document"]})
    assert status == 202, body
    rows = wait_until(lambda: [row for row in failed(project) if row["task_id"] == body["id"]], 30,
                      "the task to land in failed tasks")
    row = rows[0]
    assert row["retries"] == 0 and row["queue"] == "dataset"
    assert row["error"] == "LookupError: no document 'no-such-document'"

    # the same through the API
    status, listed = project.api.get("/v1/failed?pending=true")
    assert status == 200 and [entry["id"] for entry in listed["failed"]] == [row["id"]]
    status, shown = project.api.get(f"/v1/failed/{row['id']}")
    assert status == 200 and shown["args"] == ["no-such-document"] and "Traceback" in shown["traceback"]
    for path, expected in (("/v1/failed?limit=0", 400), ("/v1/failed?pending=maybe", 400), ("/v1/failed?x=1", 400),
                           ("/v1/failed/999", 404), ("/v1/failed/abc", 404), (f"/v1/failed/{2**70}", 404)):
        status, answer = project.api.get(path)
        assert status == expected and answer["error"], (path, status, answer)
    status, sent = project.api.post(f"/v1/failed/{row['id']}/retry")
    assert status == 202 and sent["queue"] == "dataset", sent
    # it fails again (the run still does not exist): a second dead letter, the first marked retried
    wait_until(lambda: [r for r in failed(project) if r["task_id"] == sent["retry_task_id"]], 30, "the second failure")
    first = project.api.get(f"/v1/failed/{row['id']}")[1]
    assert first["retry_task_id"] == sent["retry_task_id"] and first["retried_at"]

    # with the stack down: listing still works, a retry says why it cannot
    project.run("down")
    stack.wait(60)
    assert len(failed(project)) == 2
    refused = project.run("failed", "retry", str(row["id"]))
    assert refused.returncode == 1 and "cannot send the task again" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr


def test_failed_without_a_stack_or_database(project):
    listed = project.run("failed")
    assert listed.returncode == 0 and "no failed tasks" in listed.stdout
    for args in (("show", "7"), ("retry", "7")):
        result = project.run("failed", *args)
        assert result.returncode == 1 and "no failed task 7" in result.stderr and "Traceback" not in result.stderr
    bad = project.run("failed", "show", "seven")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
