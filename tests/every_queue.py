"""One real task through the API to each of the 16 queues of a running stack, every result
checked: the end-to-end scenario of the installed command and of the binary."""

from __future__ import annotations

import json
import sqlite3
import time

from runner.topology import QUEUE_NAMES
from tests.helpers import wait_until

GRAPH = {
    "nodes": [{"id": "start", "type": "start", "variables": ["name"]},
              {"id": "greet", "type": "template", "template": "Hello {{ name }}", "output": "greeting"},
              {"id": "end", "type": "end", "outputs": ["greeting"]}],
    "edges": [{"source": "start", "target": "greet"}, {"source": "greet", "target": "end"}],
}
TEXT = "Dify runs its background work on Celery: sixteen queues, a worker and beat. " * 20


def send(project, task: str, *args, **kwargs) -> dict:
    status, body = project.api.post(f"/v1/tasks/{task}", {"args": list(args), "kwargs": kwargs})
    assert status == 202, body
    return body


def result(project, sent: dict, timeout: float = 60) -> object:
    def finished():
        status, body = project.api.get(sent["poll"])
        assert status == 200, body
        assert body["state"] != "FAILURE", body
        return body if body["state"] == "SUCCESS" else None
    return wait_until(finished, timeout, f"{sent['task']} to succeed")["result"]


def seed_rows(database) -> None:
    now = time.time()
    with sqlite3.connect(database) as db:
        db.execute("INSERT INTO workflow_schedules (id, app_id, graph, inputs, cron, next_run_at) VALUES (?,?,?,?,?,?)",
                   ["sched-1", "app-2", json.dumps(GRAPH), json.dumps({"name": "Cron"}), "*/5 * * * *", now - 60])
        db.execute("INSERT INTO workflow_triggers (id, app_id, graph, created_at) VALUES (?,?,?,?)",
                   ["hook-1", "app-2", json.dumps(GRAPH), now])
        db.execute("INSERT INTO trigger_subscriptions (id, provider, expires_at) VALUES (?,?,?)",
                   ["sub-1", "github", now + 10])
        db.execute("INSERT INTO plugins (name, version, installed_at) VALUES ('translator', '1.0.0', ?)", [now])
        db.execute("INSERT INTO plugin_index (name, version) VALUES ('translator', '1.2.0')")


def run_a_task_on_every_queue(project) -> None:
    """`project` is a conftest.Project whose stack is up."""
    seed_rows(project.database)

    queues: dict[str, str] = {}

    def run(task: str, *args, **kwargs):
        sent = send(project, task, *args, **kwargs)
        queues[task] = sent["queue"]
        return result(project, sent)

    indexed = run("priority_document_indexing_task", "kb-1", "guide.md", TEXT)
    assert indexed["status"] == "completed" and indexed["segments"] >= 2
    assert run("document_indexing_task", "kb-1", "notes.txt", "short note")["segments"] == 1
    chunked = run("priority_rag_pipeline_run_task", f"<p>{TEXT}</p>", chunk_size=200, overlap=20)
    assert len(chunked["chunks"]) > 1 and all(len(chunk) <= 200 for chunk in chunked["chunks"])
    assert "<p>" not in chunked["chunks"][0]
    assert run("rag_pipeline_run_task", "one two three")["chunks"] == ["one two three"]
    mail = run("send_mail_task", "dev@example.com", "Welcome", "Hello from the mail queue")
    assert (project.state / "files" / "outbox" / mail["file"]).read_text().count("Hello from the mail queue") == 1
    assert run("process_trace_tasks", "app-1", "chat", {"tokens": 12})["app_id"] == "app-1"
    assert run("save_message_task", "app-1", "conv-1", "user", "hi there")["conversation_id"] == "conv-1"
    workflow = run("run_workflow_task", GRAPH, {"name": "Ann"}, app_id="app-1")
    assert workflow["status"] == "succeeded" and workflow["outputs"] == {"greeting": "Hello Ann"}
    stored = run("save_workflow_run_log_task", workflow["run_id"])
    log = json.loads((project.state / "files" / stored["log_path"]).read_text())
    assert [node["node_id"] for node in log["node_executions"]] == ["start", "greet", "end"]
    removed = run("remove_app_and_related_data_task", "app-1")["removed"]
    assert removed == {"apps": 1, "conversations": 1, "messages": 1, "workflow_runs": 1, "node_executions": 3,
                       "traces": 1, "schedules": 0, "triggers": 0, "files": 1}
    assert run("check_upgradable_plugin_task")["upgradable"] == [
        {"name": "translator", "installed": "1.0.0", "latest": "1.2.0"}]
    assert run("workflow_schedule_poller_task")["schedules"] == ["sched-1"]
    assert run("run_schedule_trigger", "sched-1")["outputs"] == {"greeting": "Hello Cron"}
    dispatched = run("dispatch_triggered_workflow_task", "hook-1", {"name": "Hook"})
    assert result(project, {"task": "run_workflow_task", "poll": f"/v1/tasks/{dispatched['run_task_id']}"}
                  )["outputs"] == {"greeting": "Hello Hook"}
    assert run("refresh_trigger_subscription_task", "sub-1", 600)["expires_at"] > time.time() + 500
    assert run("clean_task_runs_task", 30)["older_than_days"] == 30

    assert sorted(set(queues.values())) == sorted(QUEUE_NAMES)
    with sqlite3.connect(project.database) as db:
        states = dict(db.execute("SELECT name, state FROM task_runs WHERE name = 'send_mail_task'"))
        assert states == {"send_mail_task": "SUCCESS"}
        assert db.execute("SELECT COUNT(*) FROM segments WHERE dataset_id = 'kb-1'").fetchone()[0] >= 3
