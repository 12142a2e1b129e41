"""Apps and conversations (queues app_deletion, conversation)."""

from __future__ import annotations

from runner import safe_files
from runner.rag.files import stored_path
from runner.tasks.base import context, delete_older_than, new_id, now, task
from runner.tasks.workflow import run_log_relative

ROLES = ("user", "assistant", "system")


@task("save_message_task")
def save_message_task(self, app_id: str, conversation_id: str, role: str, content: str) -> dict:
    """Store one message, creating its app and conversation on first use."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    message_id = new_id()
    stamp = now()
    with context(self).database.transaction() as db:
        if db.execute("SELECT 1 FROM deleted_apps WHERE app_id = ?", [app_id]).fetchone():
            return {"message_id": None, "conversation_id": conversation_id,
                    "discarded": f"app {app_id!r} was deleted; POST /v1/apps creates it again"}
        db.execute("INSERT OR IGNORE INTO apps (id, name, created_at) VALUES (?, ?, ?)", [app_id, app_id, stamp])
        db.execute("INSERT OR IGNORE INTO conversations (id, app_id, created_at) VALUES (?, ?, ?)",
                   [conversation_id, app_id, stamp])
        owner = db.execute("SELECT app_id FROM conversations WHERE id = ?", [conversation_id]).fetchone()[0]
        if owner != app_id:
            raise ValueError(f"conversation {conversation_id!r} belongs to app {owner!r}, not {app_id!r}")
        db["messages"].insert({"id": message_id, "conversation_id": conversation_id, "role": role,
                               "content": content, "created_at": stamp})
    return {"message_id": message_id, "conversation_id": conversation_id}


@task("clean_messages")
def clean_messages(self, days: int = 30) -> dict:
    """Remove messages older than the retention period."""
    return delete_older_than(context(self), "messages", "created_at", days)


@task("remove_app_and_related_data_task")
def remove_app_and_related_data_task(self, app_id: str) -> dict:
    """Delete an app with its conversations, messages, workflow runs (and their node executions),
    run logs, schedules, triggers (and their events) and traces."""
    ctx = context(self)
    with ctx.database.transaction() as db:
        def count(sql: str) -> int:
            return db.execute(sql, [app_id]).fetchone()[0]

        removed = {
            "apps": count("SELECT COUNT(*) FROM apps WHERE id = ?"),
            "conversations": count("SELECT COUNT(*) FROM conversations WHERE app_id = ?"),
            "messages": count("SELECT COUNT(*) FROM messages JOIN conversations c ON c.id = conversation_id "
                              "WHERE c.app_id = ?"),
            "workflow_runs": count("SELECT COUNT(*) FROM workflow_runs WHERE app_id = ?"),
            "node_executions": count("SELECT COUNT(*) FROM workflow_node_executions n JOIN workflow_runs r "
                                     "ON r.id = n.run_id WHERE r.app_id = ?"),
            "traces": count("SELECT COUNT(*) FROM traces WHERE app_id = ?"),
            "schedules": count("SELECT COUNT(*) FROM workflow_schedules WHERE app_id = ?"),
            "triggers": count("SELECT COUNT(*) FROM workflow_triggers WHERE app_id = ?"),
        }
        runs = [(row[0], row[1]) for row in db.execute("SELECT id, log_path FROM workflow_runs WHERE app_id = ?",
                                                        [app_id])]
        # Explicit, child tables first, rather than relying on each ON DELETE CASCADE: a connection
        # without PRAGMA foreign_keys would otherwise leave orphans.
        statements = [
            "DELETE FROM messages WHERE conversation_id IN (SELECT id FROM conversations WHERE app_id = ?)",
            "DELETE FROM conversations WHERE app_id = ?",
            "DELETE FROM workflow_node_executions WHERE run_id IN (SELECT id FROM workflow_runs WHERE app_id = ?)",
            "DELETE FROM workflow_runs WHERE app_id = ?",
            "DELETE FROM schedule_dispatches WHERE schedule_id IN (SELECT id FROM workflow_schedules WHERE app_id = ?)",
            "DELETE FROM workflow_schedules WHERE app_id = ?",
            "DELETE FROM trigger_events WHERE trigger_id IN (SELECT id FROM workflow_triggers WHERE app_id = ?)",
            "DELETE FROM workflow_triggers WHERE app_id = ?",
            "DELETE FROM traces WHERE app_id = ?",
            "DELETE FROM apps WHERE id = ?",
        ]
        for statement in statements:
            db.execute(statement, [app_id])
        db.execute("INSERT OR REPLACE INTO deleted_apps (app_id, deleted_at) VALUES (?, ?)", [app_id, now()])
    files = 0
    for run_id, log_path in runs:
        # by id as well as by the recorded path: a log written just before its run was deleted
        # may not have had its path recorded yet
        for relative in {run_log_relative(run_id), log_path} - {None}:
            try:
                path = stored_path(ctx.paths.files, relative)
            except ValueError:  # a recorded path that would leave the file store: never followed
                continue
            files += safe_files.remove(ctx.paths.root, path)
    return {"app_id": app_id, "removed": {**removed, "files": files}}
