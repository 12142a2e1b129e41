"""Workflows, schedules and triggers (queues workflow, workflow_storage, schedule_poller,
schedule_executor, triggered_workflow_dispatcher, trigger_refresh_executor)."""

from __future__ import annotations

import json
from typing import Any

from runner import safe_files, workflow_http, workflows
from runner.context import AppContext
from runner.schedules import claim_due_schedules, claim_expiring_subscriptions
from runner.state import StatePaths
from runner.tasks.base import context, new_id, now, row_by_id, task

RUN_LOG_FOLDER = StatePaths.run_logs.relative.name  # in the file store


def run_log_relative(run_id: str) -> str:
    """Where a run's log lives in the file store (by id, so a clean-up finds it without the row)."""
    return f"{RUN_LOG_FOLDER}/{run_id}.json"


def execute_workflow(ctx: AppContext, graph: Any, inputs: dict, app_id: str | None, triggered_by: str,
                     source_id: str | None = None) -> dict:
    """Run a graph, record the run and each node's execution, and hand the log to storage."""
    limits = workflows.TemplateLimits.from_settings(ctx.settings)
    run_id = new_id()
    allowed = workflow_http.allowed_hosts(ctx.settings.DIFY_LOCAL_WORKFLOW_HTTP_ALLOWED_HOSTS)
    # run() checks the graph first: one that cannot run fails the task itself (WorkflowError)
    result = workflows.run(graph, inputs, allowed, limits)
    with ctx.database.transaction() as db:
        if app_id and db.execute("SELECT 1 FROM deleted_apps WHERE app_id = ?", [app_id]).fetchone():
            # the app was deleted while this run was in flight: recording it would leave an orphan
            return {"run_id": None, "status": "discarded", "outputs": result.outputs,
                    "error": f"app {app_id!r} was deleted; the run is not recorded"}
        db["workflow_runs"].insert({
            "id": run_id, "app_id": app_id or None, "status": result.status, "triggered_by": triggered_by,
            "graph": json.dumps(graph), "inputs": json.dumps(inputs),
            "outputs": json.dumps(result.outputs, default=str),
            "error": result.error, "created_at": result.executions[0].started_at, "finished_at": now(),
            "source_id": source_id})
        db["workflow_node_executions"].insert_all({
            "id": new_id(), "run_id": run_id, "node_id": execution.node_id, "node_type": execution.node_type,
            "status": execution.status, "inputs": json.dumps(execution.inputs, default=str),
            "outputs": json.dumps(execution.outputs, default=str), "error": execution.error,
            "started_at": execution.started_at, "finished_at": execution.finished_at,
        } for execution in result.executions)
    save_workflow_run_log_task.delay(run_id)
    return {"run_id": run_id, "status": result.status, "outputs": result.outputs, "error": result.error}


@task("run_workflow_task")
def run_workflow_task(self, graph: dict, inputs: dict, app_id: str = "", trigger_event_id: str = "") -> dict:
    """Execute a workflow graph with the given inputs."""
    if trigger_event_id:
        return execute_workflow(context(self), graph, inputs, app_id, "webhook", trigger_event_id)
    return execute_workflow(context(self), graph, inputs, app_id, "api")


@task("save_workflow_run_log_task")
def save_workflow_run_log_task(self, run_id: str) -> dict:
    """Write a run and its node executions to the file store as one JSON document."""
    ctx = context(self)
    deleted = {"run_id": run_id, "log_path": None, "skipped": "the run was deleted (its app removed)"}
    with ctx.database.connect() as db:
        found = list(db.query("SELECT * FROM workflow_runs WHERE id = ?", [run_id]))
        if not found:  # deleted before its log was written: nothing to keep, and not a failure
            return deleted
        run = found[0]
        nodes = list(db.query("SELECT * FROM workflow_node_executions WHERE run_id = ? ORDER BY started_at",
                              [run_id]))
    document = {**run, "node_executions": nodes}
    for key in ("graph", "inputs", "outputs"):
        document[key] = json.loads(document[key]) if document[key] else None
    relative = run_log_relative(run_id)
    path = ctx.paths.files / relative
    data = json.dumps(document, indent=2, default=str).encode()
    safe_files.write_atomic(ctx.paths.root, path, data)
    with ctx.database.transaction() as db:
        updated = db.execute("UPDATE workflow_runs SET log_path = ? WHERE id = ?", [relative, run_id]).rowcount
    if not updated:  # the run was deleted while its log was written: no orphan file
        safe_files.remove(ctx.paths.root, path)
        return deleted
    return {"run_id": run_id, "log_path": relative, "bytes": len(data)}


@task("workflow_schedule_poller_task")
def workflow_schedule_poller_task(self) -> dict:
    """Claim due schedules and send each due time to the executor exactly once; send refreshes
    for trigger subscriptions about to expire.

    A claim moves the schedule's next run forward and records (schedule, due time) in one write
    transaction (runner.schedules), so two pollers (two beats by mistake, or a slow poll
    overlapping the next) never send the same due time twice.
    """
    ctx = context(self)
    settings = ctx.settings

    def send(claim) -> None:
        run_schedule_trigger.apply_async(args=[claim.schedule_id], kwargs={"due_at": claim.due_at},
                                         task_id=claim.task_id)

    dispatched = claim_due_schedules(ctx.database, settings.WORKFLOW_SCHEDULE_POLLER_BATCH_SIZE,
                                     settings.WORKFLOW_SCHEDULE_MAX_DISPATCH_PER_TICK, new_id, send)
    refreshes = claim_expiring_subscriptions(ctx.database)
    for subscription_id in refreshes:
        refresh_trigger_subscription_task.delay(subscription_id)
    return {"dispatched": len(dispatched), "schedules": [claim.schedule_id for claim in dispatched],
            "refreshes": refreshes}


@task("run_schedule_trigger")
def run_schedule_trigger(self, schedule_id: str, due_at: float | None = None) -> dict:
    """Run the workflow of one due schedule."""
    ctx = context(self)
    with ctx.database.connect() as db:
        row = row_by_id(db, "workflow_schedules", schedule_id, "workflow schedule", "app_id, graph, inputs")
    result = execute_workflow(ctx, json.loads(row["graph"]), json.loads(row["inputs"]), row["app_id"], "schedule",
                              schedule_id)
    if due_at is not None:
        with ctx.database.transaction() as db:
            db.execute("UPDATE schedule_dispatches SET run_id = ? WHERE schedule_id = ? AND due_at = ?",
                       [result["run_id"], schedule_id, due_at])
    return {"schedule_id": schedule_id, "due_at": due_at, **result}


@task("dispatch_triggered_workflow_task")
def dispatch_triggered_workflow_task(self, trigger_id: str, payload: dict) -> dict:
    """Record a webhook call and send its trigger's workflow to run with the payload as inputs."""
    ctx = context(self)
    with ctx.database.connect() as db:
        trigger = row_by_id(db, "workflow_triggers", trigger_id, "workflow trigger", "app_id, graph")
    event_id, run_task_id = new_id(), new_id()
    with ctx.database.transaction() as db:  # recorded before it is sent: the run can always find its event
        db["trigger_events"].insert({"id": event_id, "trigger_id": trigger_id, "payload": json.dumps(payload),
                                     "run_task_id": run_task_id, "received_at": now()})
    run_workflow_task.apply_async(args=[json.loads(trigger["graph"]), payload, trigger["app_id"] or "", event_id],
                                  task_id=run_task_id)
    return {"event_id": event_id, "trigger_id": trigger_id, "run_task_id": run_task_id}


@task("refresh_trigger_subscription_task")
def refresh_trigger_subscription_task(self, subscription_id: str, ttl_seconds: int = 0) -> dict:
    """Extend a trigger subscription before it expires (by ttl_seconds, or its own TTL when 0)."""
    stamp = now()
    with context(self).database.transaction() as db:
        row = row_by_id(db, "trigger_subscriptions", subscription_id, "trigger subscription", "ttl_seconds")
        ttl = ttl_seconds if ttl_seconds > 0 else row["ttl_seconds"]
        db.execute("UPDATE trigger_subscriptions SET expires_at = ?, refreshed_at = ?, "
                   "refresh_count = refresh_count + 1, refresh_claimed_until = NULL WHERE id = ?",
                   [stamp + ttl, stamp, subscription_id])
    return {"subscription_id": subscription_id, "expires_at": stamp + ttl}
