"""Workflows, schedules and triggers (queues workflow, workflow_storage, schedule_poller,
schedule_executor, triggered_workflow_dispatcher, trigger_refresh_executor)."""

from __future__ import annotations

import json
import os
from typing import Any

from runner import cron, workflows
from runner.context import AppContext
from runner.tasks.base import context, new_id, now, row_by_id, task

RUN_LOG_FOLDER = "workflow-runs"


def execute_workflow(ctx: AppContext, graph: Any, inputs: dict, app_id: str | None, triggered_by: str) -> dict:
    """Run a graph, record the run and each node's execution, and hand the log to storage."""
    workflows.validate(graph)  # a graph that cannot run fails the task itself
    run_id = new_id()
    result = workflows.run(graph, inputs)
    with ctx.database.transaction() as db:
        db["workflow_runs"].insert({
            "id": run_id, "app_id": app_id or None, "status": result.status, "triggered_by": triggered_by,
            "graph": json.dumps(graph), "inputs": json.dumps(inputs), "outputs": json.dumps(result.outputs),
            "error": result.error, "created_at": result.executions[0].started_at, "finished_at": now()})
        db["workflow_node_executions"].insert_all({
            "id": new_id(), "run_id": run_id, "node_id": execution.node_id, "node_type": execution.node_type,
            "status": execution.status, "inputs": json.dumps(execution.inputs, default=str),
            "outputs": json.dumps(execution.outputs, default=str), "error": execution.error,
            "started_at": execution.started_at, "finished_at": execution.finished_at,
        } for execution in result.executions)
    save_workflow_run_log_task.delay(run_id)
    return {"run_id": run_id, "status": result.status, "outputs": result.outputs, "error": result.error}


@task("run_workflow_task")
def run_workflow_task(self, graph: dict, inputs: dict, app_id: str = "") -> dict:
    """Execute a workflow graph with the given inputs."""
    return execute_workflow(context(self), graph, inputs, app_id, "api")


@task("save_workflow_run_log_task")
def save_workflow_run_log_task(self, run_id: str) -> dict:
    """Write a run and its node executions to the file store as one JSON document."""
    ctx = context(self)
    with ctx.database.connect() as db:
        run = row_by_id(db, "workflow_runs", run_id, "workflow run")
        nodes = list(db.query("SELECT * FROM workflow_node_executions WHERE run_id = ? ORDER BY started_at",
                              [run_id]))
    document = {**run, "node_executions": nodes}
    for key in ("graph", "inputs", "outputs"):
        document[key] = json.loads(document[key]) if document[key] else None
    relative = f"{RUN_LOG_FOLDER}/{run_id}.json"
    path = ctx.paths.files / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(document, indent=2, default=str), encoding="utf-8")
    os.replace(partial, path)
    with ctx.database.transaction() as db:
        db.execute("UPDATE workflow_runs SET log_path = ? WHERE id = ?", [relative, run_id])
    return {"run_id": run_id, "log_path": relative, "bytes": path.stat().st_size}


@task("workflow_schedule_poller_task")
def workflow_schedule_poller_task(self) -> dict:
    """Claim due schedules and send each to the executor once.

    The claim moves a schedule's next run forward inside one write transaction, so two pollers
    (two beats by mistake, or a slow poll overlapping the next) never claim the same due time.
    """
    ctx = context(self)
    settings = ctx.settings
    limit = settings.WORKFLOW_SCHEDULE_POLLER_BATCH_SIZE
    if settings.WORKFLOW_SCHEDULE_MAX_DISPATCH_PER_TICK:
        limit = min(limit, settings.WORKFLOW_SCHEDULE_MAX_DISPATCH_PER_TICK)
    stamp = now()
    claimed: list[str] = []
    with ctx.database.connect() as db:
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            due = list(db.query("SELECT id, cron FROM workflow_schedules WHERE enabled = 1 AND next_run_at <= ? "
                                "ORDER BY next_run_at LIMIT ?", [stamp, limit]))
            for row in due:
                try:
                    following = cron.next_fire(row["cron"], stamp)
                except cron.CronError:
                    db.execute("UPDATE workflow_schedules SET enabled = 0 WHERE id = ?", [row["id"]])
                    continue
                db.execute("UPDATE workflow_schedules SET next_run_at = ?, last_run_at = ? WHERE id = ?",
                           [following, stamp, row["id"]])
                claimed.append(row["id"])
            db.conn.execute("COMMIT")
        except BaseException:
            db.conn.execute("ROLLBACK")
            raise
    for schedule_id in claimed:
        run_schedule_trigger.delay(schedule_id)
    return {"dispatched": len(claimed), "schedules": claimed}


@task("run_schedule_trigger")
def run_schedule_trigger(self, schedule_id: str) -> dict:
    """Run the workflow of one due schedule."""
    ctx = context(self)
    with ctx.database.connect() as db:
        row = row_by_id(db, "workflow_schedules", schedule_id, "workflow schedule", "app_id, graph, inputs")
    result = execute_workflow(ctx, json.loads(row["graph"]), json.loads(row["inputs"]), row["app_id"], "schedule")
    return {"schedule_id": schedule_id, **result}


@task("dispatch_triggered_workflow_task")
def dispatch_triggered_workflow_task(self, trigger_id: str, payload: dict) -> dict:
    """Record a webhook call and send its trigger's workflow to run with the payload as inputs."""
    ctx = context(self)
    with ctx.database.connect() as db:
        trigger = row_by_id(db, "workflow_triggers", trigger_id, "workflow trigger", "app_id, graph")
    sent = run_workflow_task.delay(json.loads(trigger["graph"]), payload, trigger["app_id"] or "")
    event_id = new_id()
    with ctx.database.transaction() as db:
        db["trigger_events"].insert({"id": event_id, "trigger_id": trigger_id, "payload": json.dumps(payload),
                                     "run_task_id": sent.id, "received_at": now()})
    return {"event_id": event_id, "trigger_id": trigger_id, "run_task_id": sent.id}


@task("refresh_trigger_subscription_task")
def refresh_trigger_subscription_task(self, subscription_id: str, ttl_seconds: int = 3600) -> dict:
    """Extend a trigger subscription before it expires."""
    stamp = now()
    with context(self).database.transaction() as db:
        cursor = db.execute("UPDATE trigger_subscriptions SET expires_at = ?, refreshed_at = ?, "
                            "refresh_count = refresh_count + 1 WHERE id = ?",
                            [stamp + ttl_seconds, stamp, subscription_id])
        if cursor.rowcount == 0:
            raise LookupError(f"no trigger subscription {subscription_id!r}")
    return {"subscription_id": subscription_id, "expires_at": stamp + ttl_seconds}
