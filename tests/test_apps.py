"""Apps through the running stack: deleting an app removes everything it owns, rows and files, and
nothing of another app; clean_messages removes only messages past their retention."""

from __future__ import annotations

import json
import sqlite3
import time

from tests.flows_support import GREETING, accepted, rows, run_task, run_with_log, task_result

# Every table with rows an app owns, and how to find those left without their parent.
ORPHANS = {
    "messages": "SELECT COUNT(*) FROM messages WHERE conversation_id NOT IN (SELECT id FROM conversations)",
    "conversations": "SELECT COUNT(*) FROM conversations WHERE app_id NOT IN (SELECT id FROM apps)",
    "node_executions": "SELECT COUNT(*) FROM workflow_node_executions "
                       "WHERE run_id NOT IN (SELECT id FROM workflow_runs)",
    "trigger_events": "SELECT COUNT(*) FROM trigger_events WHERE trigger_id NOT IN (SELECT id FROM workflow_triggers)",
    "schedule_dispatches": "SELECT COUNT(*) FROM schedule_dispatches "
                           "WHERE schedule_id NOT IN (SELECT id FROM workflow_schedules)",
}
BY_APP = ("conversations", "workflow_runs", "traces", "workflow_schedules", "workflow_triggers")


def fill_app(project, app_id: str) -> list[str]:
    """Two conversations of messages, a workflow run, a webhook run, a schedule's run and a trace; the run ids."""
    status, body = project.api.post("/v1/apps", {"id": app_id, "name": f"App {app_id}"})
    assert status == 201, body
    for conversation, role, content in [("c1", "user", "hi"), ("c1", "assistant", "hello"), ("c2", "user", "yo")]:
        sent = accepted(project.api.post(f"/v1/apps/{app_id}/messages", {
            "conversation_id": f"{app_id}-{conversation}", "role": role, "content": content}))
        task_result(project, sent["poll"])
    runs = [task_result(project, accepted(project.api.post("/v1/workflows/run", {
        "graph": GREETING, "inputs": {"name": app_id}, "app_id": app_id}))["poll"])["run_id"]]
    status, trigger = project.api.post("/v1/triggers", {"graph": GREETING, "app_id": app_id})
    assert status == 201
    dispatched = task_result(project, accepted(project.api.post(trigger["webhook"], {"name": "hook"}))["poll"])
    runs.append(task_result(project, f"/v1/tasks/{dispatched['run_task_id']}")["run_id"])
    status, schedule = project.api.post("/v1/schedules", {"graph": GREETING, "cron": "0 0 1 1 *",
                                                          "inputs": {"name": "cron"}, "app_id": app_id})
    assert status == 201
    with sqlite3.connect(project.database) as db:
        db.execute("UPDATE workflow_schedules SET next_run_at = ? WHERE id = ?", [time.time() - 5, schedule["id"]])
    polled = run_task(project, "workflow_schedule_poller_task")
    assert polled["schedules"] == [schedule["id"]]
    [(task_id,)] = rows(project, "SELECT task_id FROM schedule_dispatches WHERE schedule_id = ?", (schedule["id"],))
    runs.append(task_result(project, f"/v1/tasks/{task_id}")["run_id"])
    run_task(project, "process_trace_tasks", app_id, "chat", {"tokens": 3})
    for run_id in runs:
        run_with_log(project, run_id)
    return runs


def test_deleting_an_app_removes_its_rows_and_files_and_nothing_else(project):
    project.up(env={"ENABLE_WORKFLOW_SCHEDULE_POLLER_TASK": "false"})
    doomed = fill_app(project, "doomed")
    kept = fill_app(project, "kept")
    status, holding = project.api.get("/v1/apps/doomed")
    assert status == 200 and holding["holds"] == {"conversations": 2, "messages": 3, "workflow_runs": 3,
                                                  "traces": 1, "schedules": 1, "triggers": 1}
    logs = project.state / "files" / "workflow-runs"
    assert all((logs / f"{run_id}.json").is_file() for run_id in doomed + kept)

    sent = accepted(project.api.request("DELETE", "/v1/apps/doomed"))
    removed = task_result(project, sent["poll"])["removed"]
    assert removed == {"apps": 1, "conversations": 2, "messages": 3, "workflow_runs": 3, "node_executions": 9,
                       "traces": 1, "schedules": 1, "triggers": 1, "files": 3}

    assert rows(project, "SELECT COUNT(*) FROM apps WHERE id = 'doomed'") == [(0,)]
    for table in BY_APP:
        assert rows(project, f"SELECT COUNT(*) FROM {table} WHERE app_id = 'doomed'") == [(0,)], table
    for what, sql in ORPHANS.items():
        assert rows(project, sql) == [(0,)], what
    assert not any((logs / f"{run_id}.json").exists() for run_id in doomed)
    assert sorted(path.name for path in logs.iterdir()) == sorted(f"{run_id}.json" for run_id in kept)
    # the other app is untouched
    status, other = project.api.get("/v1/apps/kept")
    assert other["holds"] == {"conversations": 2, "messages": 3, "workflow_runs": 3, "traces": 1,
                              "schedules": 1, "triggers": 1}
    assert rows(project, "SELECT COUNT(*) FROM workflow_node_executions")[0][0] == 9
    # a run log task arriving after the cascade (it raced the deletion) writes nothing back
    late = run_task(project, "save_workflow_run_log_task", doomed[0])
    assert late["log_path"] is None and "deleted" in late["skipped"]
    assert not (logs / f"{doomed[0]}.json").exists()
    assert project.api.get("/v1/apps/doomed")[0] == 404
    assert project.api.request("DELETE", "/v1/apps/doomed")[0] == 404

    # work for the app still in flight when it was deleted is discarded, not left as an orphan
    late_run = run_task(project, "run_workflow_task", GREETING, {"name": "late"}, "doomed")
    assert late_run["status"] == "discarded" and late_run["run_id"] is None
    assert run_task(project, "save_message_task", "doomed", "doomed-c3", "user", "late")["message_id"] is None
    assert rows(project, "SELECT COUNT(*) FROM workflow_runs WHERE app_id = 'doomed'") == [(0,)]
    assert rows(project, "SELECT COUNT(*) FROM conversations WHERE app_id = 'doomed'") == [(0,)]
    assert rows(project, "SELECT COUNT(*) FROM apps WHERE id = 'doomed'") == [(0,)]
    # creating it again through the API lifts that
    assert project.api.post("/v1/apps", {"id": "doomed", "name": "Again"})[0] == 201
    assert run_task(project, "save_message_task", "doomed", "doomed-c3", "user", "back")["message_id"]


def test_clean_messages_removes_only_messages_past_retention(project):
    project.up()
    sent = accepted(project.api.post("/v1/apps/chat/messages", {"conversation_id": "c", "role": "user",
                                                                "content": "recent"}))
    task_result(project, sent["poll"])
    with sqlite3.connect(project.database) as db:
        db.execute("INSERT INTO messages (id, conversation_id, role, content, created_at) VALUES (?,?,?,?,?)",
                   ["old", "c", "user", "old", time.time() - 40 * 86400])
    assert run_task(project, "clean_messages", 30)["removed"] == 1
    assert rows(project, "SELECT content FROM messages") == [("recent",)]


def test_bad_app_requests_are_4xx_naming_the_field(project):
    project.up()
    assert project.api.post("/v1/apps", {"id": "a1", "name": "One"})[0] == 201
    cases = [
        ("POST", "/v1/apps", {}, 400, "'name' is required"),
        ("POST", "/v1/apps", {"name": ""}, 400, "'name' must be a non-empty string"),
        ("POST", "/v1/apps", {"name": "x", "id": "../x"}, 400, "'id' must be"),
        ("POST", "/v1/apps", {"name": "x", "id": "a1"}, 409, "exists already"),
        ("POST", "/v1/apps/a1/messages", {"conversation_id": "c", "role": "robot", "content": "x"}, 400,
         "'role' must be one of user, assistant, system"),
        ("POST", "/v1/apps/a1/messages", {"conversation_id": "c", "role": "user"}, 400, "'content' is required"),
        ("POST", "/v1/apps/a1/messages", {"conversation_id": 5, "role": "user", "content": "x"}, 400,
         "'conversation_id' must be"),
        ("GET", "/v1/apps/nope", None, 404, "no app 'nope'"),
        ("DELETE", "/v1/apps/nope", None, 404, "no app 'nope'"),
        ("GET", "/v1/apps/bad%20id", None, 400, "'app_id' must be"),
    ]
    for method, path, body, expected, words in cases:
        raw = json.dumps(body).encode() if body is not None else None
        status, answer = project.api.request(method, path, raw=raw)
        assert status == expected and words in answer["error"], (method, path, body, status, answer)
