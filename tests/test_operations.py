"""Operations through a running stack: the dataset queue monitor's alert mail, retention of
tokens, temporary files, rotated logs and queue samples, the stand-in vector-store pool, traces and metrics."""

from __future__ import annotations

import os
import sqlite3
import time

from runner.topology import QUEUE_NAMES
from tests.helpers import wait_until

STACK = "broker: dify-local serve broker\napi: dify-local serve api\nbeat: dify-local serve beat\n"


def finished(project, task_id: str, timeout: float = 30) -> dict:
    def done():
        status, body = project.api.get(f"/v1/tasks/{task_id}")
        return body if body["state"] in ("SUCCESS", "FAILURE") else None
    return wait_until(done, timeout, f"task {task_id} to finish")


def run(project, task: str, *args, **options) -> dict:
    status, body = project.api.post(f"/v1/tasks/{task}", {"args": list(args), **options})
    assert status == 202, body
    return finished(project, body["id"])


def test_queue_monitor_mails_an_alert_when_dataset_is_over_the_threshold(project):
    # a second worker serves dataset, and is stopped once ready, so the queue fills with nobody
    # consuming it (a Procfile leaving it out would do too: `up` only warns about it).
    others = ",".join(name for name in QUEUE_NAMES if name != "dataset")
    (project.dir / "Procfile").write_text(STACK + f"worker: dify-local serve worker -Q {others}\n"
                                          "datasetworker: dify-local serve worker -Q dataset\n")
    project.up(env={"QUEUE_MONITOR_THRESHOLD": "3",
                    "QUEUE_MONITOR_ALERT_EMAILS": "oncall@example.com,lead@example.com"})
    stopped = project.run("stop", "datasetworker")
    assert stopped.returncode == 0, stopped.stderr

    below = run(project, "datasets_queue_monitor")
    assert below["result"] == {"queue": "dataset", "depth": 0, "threshold": 3, "alerted": []}
    for index in range(4):  # two in kombu's priority sub-lists: the monitor counts them too
        status, body = project.api.post("/v1/tasks/document_indexing_task",
                                        {"args": ["ds", f"doc{index}.txt", "text"], "priority": index * 3})
        assert status == 202, body
    depths = {queue["name"]: queue["depth"] for queue in project.api.get("/v1/queues")[1]["queues"]}
    assert depths["dataset"] == 4
    alert = run(project, "datasets_queue_monitor")
    assert alert["result"]["depth"] == 4 and alert["result"]["alerted"] == ["oncall@example.com", "lead@example.com"]

    for address in ("oncall@example.com", "lead@example.com"):
        listed = wait_until(lambda to=address: project.api.get(f"/v1/mail?to={to}")[1]["mail"], 30,
                            f"the alert mail to {address}")
        assert listed[0]["subject"] == "Queue dataset holds 4 tasks (threshold 3)"
        mail = project.api.get(f"/v1/mail/{listed[0]['name']}")[1]
        assert 'the queue "dataset" holds 4 waiting tasks' in mail["text"]
        assert (project.state / "files" / "outbox" / listed[0]["name"]).is_file()


def test_retention_removes_expired_tokens_old_temp_files_and_rotated_logs(project):
    project.up(env={"DIFY_LOCAL_QUEUE_SAMPLE_INTERVAL": "1", "DIFY_LOCAL_QUEUE_SAMPLE_RETENTION_HOURS": "2"})
    stamp = time.time()
    with sqlite3.connect(project.database) as db:
        insert = "INSERT INTO tokens VALUES (?, 'reset_password', 'a@example.com', ?, ?)"
        db.execute(insert, ["old", stamp - 600, stamp - 1])
        db.execute(insert, ["new", stamp, stamp + 300])
    removed = run(project, "clean_expired_tokens_task")
    assert removed["result"] == {"removed": 1}
    with sqlite3.connect(project.database) as db:
        assert [row[0] for row in db.execute("SELECT token FROM tokens")] == ["new"]

    temp = project.state / "files" / "tmp"
    (temp / "upload-1").mkdir(parents=True)
    old, fresh, outside = temp / "upload-1" / "part", temp / "fresh", project.dir / "keep-me"
    for path in (old, fresh, outside):
        path.write_text("x" * 10)
    (temp / "link").symlink_to(outside)
    day_ago = stamp - 86400 - 60
    for path in (old, outside):
        os.utime(path, (day_ago, day_ago))
    os.utime(temp / "link", (day_ago, day_ago), follow_symlinks=False)
    cleaned = run(project, "clean_temp_files_task")
    assert cleaned["result"] == {"files": 2, "bytes": 10, "older_than_hours": 24}
    assert fresh.exists() and not old.exists() and not (temp / "upload-1").exists() and not (temp / "link").exists()
    assert outside.read_text() == "x" * 10  # a link's target is never touched

    logs = project.state / "logs"
    rotated, recent = logs / "worker.log.1", logs / "api.log.1"
    rotated.write_text("old lines\n")
    recent.write_text("newer lines\n")
    weeks_ago = stamp - 15 * 86400
    os.utime(rotated, (weeks_ago, weeks_ago))
    os.utime(logs / "worker.log", (weeks_ago, weeks_ago))  # a live log, however old, stays
    logs_cleaned = run(project, "clean_old_logs_task")
    assert logs_cleaned["result"]["files"] == 1 and logs_cleaned["result"]["older_than_days"] == 14
    assert not rotated.exists() and recent.exists() and (logs / "worker.log").exists()

    # queue depth samples: beat writes one per queue every DIFY_LOCAL_QUEUE_SAMPLE_INTERVAL seconds,
    # retention removes those older than DIFY_LOCAL_QUEUE_SAMPLE_RETENTION_HOURS
    def sampled():
        with sqlite3.connect(project.database) as db:
            return db.execute("SELECT COUNT(DISTINCT queue), COUNT(DISTINCT at) FROM queue_samples").fetchone()
    wait_until(lambda: sampled()[0] == len(QUEUE_NAMES) and sampled()[1] >= 2, 30, "beat's samples of every queue")
    with sqlite3.connect(project.database) as db:
        db.executemany("INSERT INTO queue_samples VALUES (?, 'mail', 1, NULL)",
                       [[stamp - 2 * 3600 - 60], [stamp - 2 * 3600 + 600]])
    cleaned = run(project, "clean_queue_samples_task")
    assert cleaned["result"] == {"removed": 1, "older_than_hours": 2}
    with sqlite3.connect(project.database) as db:
        assert db.execute("SELECT COUNT(*) FROM queue_samples WHERE at < ?", [stamp - 3600]).fetchone() == (1,)
        assert db.execute("SELECT COUNT(*) FROM queue_samples WHERE at >= ?", [stamp - 60]).fetchone()[0] > 0


def test_vector_store_pool_embedding_cache_and_traces(project):
    project.up()
    created = run(project, "create_tidb_serverless_task", 3)
    assert created["result"] == {"created": 3, "pool_size": 3}
    assert run(project, "create_tidb_serverless_task", 3)["result"]["created"] == 0  # topped up already
    assert run(project, "update_tidb_serverless_status_task")["result"] == {"activated": 3}
    with sqlite3.connect(project.database) as db:
        assert dict(db.execute("SELECT status, COUNT(*) FROM vector_store_instances GROUP BY status")) == {"active": 3}
        db.execute("INSERT INTO embedding_cache VALUES ('stale', x'00', ?)", [time.time() - 8 * 86400])
        db.execute("INSERT INTO embedding_cache VALUES ('fresh', x'00', ?)", [time.time()])
    assert run(project, "clean_embedding_cache_task")["result"] == {"removed": 1, "older_than_days": 7}

    trace = run(project, "process_trace_tasks", "app1", "chat", {"tokens": 12})
    assert trace["state"] == "SUCCESS"
    with sqlite3.connect(project.database) as db:
        assert db.execute("SELECT app_id, name, data FROM traces").fetchall() == [("app1", "chat", '{"tokens": 12}')]

    # per-task metrics, kept as the runs finish
    def pool_metrics():
        status, body = project.api.get("/v1/metrics?task=create_tidb_serverless_task&hours=1")
        assert status == 200, body
        return body["tasks"] if body["tasks"] and body["tasks"][0]["finished"] == 2 else None
    row, = wait_until(pool_metrics, 10, "the metrics of create_tidb_serverless_task")
    assert row["task"] == "create_tidb_serverless_task"
    assert (row["succeeded"], row["failed"], row["retried"]) == (2, 0, 0)
    assert 0 < row["runtime_mean"] <= row["runtime_max"] < 5
    wait_until(lambda: {"process_trace_tasks", "clean_embedding_cache_task"} <= {
        entry["task"] for entry in project.api.get("/v1/metrics")[1]["tasks"]}, 10, "the other tasks' metrics")
    assert project.api.get("/v1/metrics")[1]["hours"] == 24
    for query in ("hours=0", "hours=x", "task=a%20b", "color=red"):
        status, body = project.api.get(f"/v1/metrics?{query}")
        assert status == 400 and body["error"], query
