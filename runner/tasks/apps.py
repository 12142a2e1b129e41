"""Apps and conversations (queues app_deletion, conversation)."""

from __future__ import annotations

from pathlib import Path

from runner.tasks.base import context, delete_older_than, new_id, now, task

ROLES = ("user", "assistant", "system")


@task("save_message_task")
def save_message_task(self, app_id: str, conversation_id: str, role: str, content: str) -> dict:
    """Store one message, creating its app and conversation on first use."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    message_id = new_id()
    stamp = now()
    with context(self).database.transaction() as db:
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
    """Delete an app with its conversations, messages, workflow runs, run logs and traces."""
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
            "traces": count("SELECT COUNT(*) FROM traces WHERE app_id = ?"),
        }
        log_paths = [row[0] for row in db.execute(
            "SELECT log_path FROM workflow_runs WHERE app_id = ? AND log_path IS NOT NULL", [app_id])]
        # conversations and messages go with the app (ON DELETE CASCADE); the rest name it by id
        for table in ("workflow_runs", "traces", "workflow_schedules", "workflow_triggers"):
            db.execute(f"DELETE FROM {table} WHERE app_id = ?", [app_id])
        db.execute("DELETE FROM apps WHERE id = ?", [app_id])
    files = 0
    for relative in log_paths:
        path = ctx.paths.files / relative
        if Path(path).resolve().is_relative_to(ctx.paths.files.resolve()) and path.exists():
            path.unlink()
            files += 1
    return {"app_id": app_id, "removed": {**removed, "files": files}}
