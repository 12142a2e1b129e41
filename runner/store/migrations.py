"""Versioned schema migrations of the metadata store (sqlite-utils' migration sets).

Migrations are applied in declaration order and never edited once released: a change to the
schema is a new migration at the end. `apply` holds SQLite's write lock for the whole run, so two
processes starting together (api and worker) cannot both apply the same migration.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlite_utils import Migrations

from runner.store.database import Database

migrations = Migrations("dify-local")


@migrations(name="0001_task_runs")
def _task_runs(db) -> None:
    db.execute("""
        CREATE TABLE task_runs (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            queue TEXT,
            state TEXT NOT NULL,
            args TEXT,
            kwargs TEXT,
            worker TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            queued_at REAL,
            started_at REAL,
            finished_at REAL,
            runtime REAL,
            error TEXT
        )""")
    db.execute("CREATE INDEX task_runs_started ON task_runs (started_at)")
    db.execute("CREATE INDEX task_runs_state ON task_runs (state, finished_at)")
    db.execute("CREATE INDEX task_runs_name ON task_runs (name)")


@migrations(name="0002_domain")
def _domain(db) -> None:
    statements = [
        # knowledge base
        """CREATE TABLE datasets (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, owner_email TEXT,
            created_at REAL NOT NULL, updated_at REAL NOT NULL)""",
        """CREATE TABLE documents (
            id TEXT PRIMARY KEY,
            dataset_id TEXT NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
            name TEXT NOT NULL, status TEXT NOT NULL, error TEXT, segment_count INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL, updated_at REAL NOT NULL, completed_at REAL)""",
        """CREATE TABLE segments (
            id TEXT PRIMARY KEY,
            document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
            dataset_id TEXT NOT NULL, position INTEGER NOT NULL, content TEXT NOT NULL,
            embedding BLOB NOT NULL, created_at REAL NOT NULL)""",
        "CREATE INDEX segments_dataset ON segments (dataset_id)",
        """CREATE TABLE embedding_cache (
            text_hash TEXT PRIMARY KEY, embedding BLOB NOT NULL, created_at REAL NOT NULL)""",
        """CREATE TABLE dataset_cleanups (
            id INTEGER PRIMARY KEY AUTOINCREMENT, dataset_id TEXT NOT NULL, dataset_name TEXT NOT NULL,
            owner_email TEXT, cleaned_at REAL NOT NULL, notified_at REAL)""",
        # local stand-in for Dify's TiDB serverless pool
        """CREATE TABLE vector_store_instances (
            id TEXT PRIMARY KEY, status TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL)""",
        # apps and conversations
        "CREATE TABLE apps (id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at REAL NOT NULL)",
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY, app_id TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
            created_at REAL NOT NULL)""",
        """CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL, content TEXT NOT NULL, created_at REAL NOT NULL)""",
        "CREATE INDEX messages_created ON messages (created_at)",
        """CREATE TABLE traces (
            id TEXT PRIMARY KEY, app_id TEXT, name TEXT NOT NULL, data TEXT NOT NULL, created_at REAL NOT NULL)""",
        "CREATE INDEX traces_app ON traces (app_id)",
        # workflows, schedules, triggers
        """CREATE TABLE workflow_runs (
            id TEXT PRIMARY KEY, app_id TEXT, status TEXT NOT NULL, triggered_by TEXT NOT NULL,
            graph TEXT NOT NULL, inputs TEXT NOT NULL, outputs TEXT, error TEXT, log_path TEXT,
            created_at REAL NOT NULL, finished_at REAL)""",
        "CREATE INDEX workflow_runs_app ON workflow_runs (app_id)",
        """CREATE TABLE workflow_node_executions (
            id TEXT PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES workflow_runs(id) ON DELETE CASCADE,
            node_id TEXT NOT NULL, node_type TEXT NOT NULL, status TEXT NOT NULL,
            inputs TEXT, outputs TEXT, error TEXT, started_at REAL NOT NULL, finished_at REAL)""",
        """CREATE TABLE workflow_schedules (
            id TEXT PRIMARY KEY, app_id TEXT, graph TEXT NOT NULL, inputs TEXT NOT NULL DEFAULT '{}',
            cron TEXT NOT NULL, enabled INTEGER NOT NULL DEFAULT 1,
            next_run_at REAL NOT NULL, last_run_at REAL, claimed_until REAL)""",
        "CREATE INDEX workflow_schedules_due ON workflow_schedules (enabled, next_run_at)",
        """CREATE TABLE workflow_triggers (
            id TEXT PRIMARY KEY, app_id TEXT, graph TEXT NOT NULL, created_at REAL NOT NULL)""",
        """CREATE TABLE trigger_events (
            id TEXT PRIMARY KEY, trigger_id TEXT NOT NULL REFERENCES workflow_triggers(id) ON DELETE CASCADE,
            payload TEXT NOT NULL, run_task_id TEXT, received_at REAL NOT NULL)""",
        """CREATE TABLE trigger_subscriptions (
            id TEXT PRIMARY KEY, provider TEXT NOT NULL, expires_at REAL NOT NULL,
            refreshed_at REAL, refresh_count INTEGER NOT NULL DEFAULT 0)""",
        # plugins
        """CREATE TABLE plugins (
            name TEXT PRIMARY KEY, version TEXT NOT NULL, installed_at REAL NOT NULL,
            latest_version TEXT, checked_at REAL)""",
        "CREATE TABLE plugin_index (name TEXT PRIMARY KEY, version TEXT NOT NULL)",
    ]
    for statement in statements:
        db.execute(statement)


@migrations(name="0003_knowledge")
def _knowledge(db) -> None:
    """Uploaded documents (file, type, size, segmenting, metadata), each document's status history,
    and which embedder made each segment's vector (vectors of different embedders are never compared)."""
    statements = [
        "ALTER TABLE datasets ADD COLUMN description TEXT",
        "ALTER TABLE datasets ADD COLUMN chunk_size INTEGER",
        "ALTER TABLE datasets ADD COLUMN chunk_overlap INTEGER",
        "ALTER TABLE documents ADD COLUMN source TEXT NOT NULL DEFAULT 'text'",
        "ALTER TABLE documents ADD COLUMN file_type TEXT",
        "ALTER TABLE documents ADD COLUMN file_path TEXT",
        "ALTER TABLE documents ADD COLUMN size INTEGER",
        "ALTER TABLE documents ADD COLUMN chunk_size INTEGER",
        "ALTER TABLE documents ADD COLUMN chunk_overlap INTEGER",
        "ALTER TABLE documents ADD COLUMN metadata TEXT",
        "CREATE INDEX documents_dataset ON documents (dataset_id, created_at)",
        "ALTER TABLE segments ADD COLUMN word_count INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE segments ADD COLUMN embedding_model TEXT",
        "CREATE INDEX segments_document ON segments (document_id, position)",
        """CREATE TABLE document_events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
            status TEXT NOT NULL, at REAL NOT NULL, message TEXT)""",
        "CREATE INDEX document_events_document ON document_events (document_id, id)",
    ]
    for statement in statements:
        db.execute(statement)


def _metrics_trigger(name: str, event: str, when: str) -> str:
    """A trigger adding a task_runs row's finish (an attempt) to its task's metrics for that hour."""
    return f"""CREATE TRIGGER task_runs_metrics_{name} AFTER {event} ON task_runs WHEN {when}
        BEGIN
            INSERT INTO task_metrics (name, hour, finished, succeeded, failed, retried, runtime_total, runtime_max)
            VALUES (NEW.name, CAST(NEW.finished_at / 3600 AS INTEGER) * 3600, 1, NEW.state = 'SUCCESS',
                    NEW.state = 'FAILURE', NEW.state = 'RETRY', COALESCE(NEW.runtime, 0), COALESCE(NEW.runtime, 0))
            ON CONFLICT (name, hour) DO UPDATE SET
                finished = finished + 1, succeeded = succeeded + excluded.succeeded, failed = failed + excluded.failed,
                retried = retried + excluded.retried, runtime_total = runtime_total + excluded.runtime_total,
                runtime_max = MAX(runtime_max, excluded.runtime_max);
        END"""


@migrations(name="0004_operations")
def _operations(db) -> None:
    statements = [
        # the seed's dead letters: tasks that failed for good (retries exhausted, or none allowed)
        """CREATE TABLE failed_tasks (
            id INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL, name TEXT NOT NULL, queue TEXT,
            args TEXT NOT NULL, kwargs TEXT NOT NULL, error TEXT NOT NULL, traceback TEXT,
            retries INTEGER NOT NULL DEFAULT 0, worker TEXT, failed_at REAL NOT NULL,
            retried_at REAL, retry_task_id TEXT)""",
        "CREATE INDEX failed_tasks_failed ON failed_tasks (failed_at)",
        # one-time tokens (password reset codes), removed by retention once expired
        """CREATE TABLE tokens (
            token TEXT PRIMARY KEY, purpose TEXT NOT NULL, email TEXT NOT NULL,
            created_at REAL NOT NULL, expires_at REAL NOT NULL)""",
        "CREATE INDEX tokens_expires ON tokens (expires_at)",
        # per-task metrics by the hour, kept by triggers as task_runs rows finish (every attempt,
        # retries included), so they outlive the task runs retention removes
        """CREATE TABLE task_metrics (
            name TEXT NOT NULL, hour INTEGER NOT NULL, finished INTEGER NOT NULL, succeeded INTEGER NOT NULL,
            failed INTEGER NOT NULL, retried INTEGER NOT NULL, runtime_total REAL NOT NULL,
            runtime_max REAL NOT NULL, PRIMARY KEY (name, hour))""",
        _metrics_trigger("insert", "INSERT", "NEW.finished_at IS NOT NULL"),
        _metrics_trigger("update", "UPDATE OF finished_at", "NEW.finished_at IS NOT NULL AND "
                         "(OLD.finished_at IS NULL OR NEW.finished_at != OLD.finished_at)"),
    ]
    for statement in statements:
        db.execute(statement)


@migrations(name="0005_flows")
def _flows(db) -> None:
    statements = [
        # one row per (schedule, due time) ever dispatched: the primary key makes a second dispatch of
        # the same due time impossible, whatever number of pollers run
        """CREATE TABLE schedule_dispatches (
            schedule_id TEXT NOT NULL REFERENCES workflow_schedules(id) ON DELETE CASCADE,
            due_at REAL NOT NULL, task_id TEXT NOT NULL, dispatched_at REAL NOT NULL, run_id TEXT,
            PRIMARY KEY (schedule_id, due_at))""",
        # what started a run: the schedule's id, the webhook event's id (NULL when sent directly)
        "ALTER TABLE workflow_runs ADD COLUMN source_id TEXT",
        "CREATE INDEX workflow_runs_source ON workflow_runs (source_id)",
        "ALTER TABLE workflow_schedules ADD COLUMN created_at REAL",
        # a refresh sent and not yet done: the poller does not send another before this time
        "ALTER TABLE trigger_subscriptions ADD COLUMN refresh_claimed_until REAL",
        "ALTER TABLE trigger_subscriptions ADD COLUMN ttl_seconds INTEGER NOT NULL DEFAULT 3600",
        # what an installed plugin's package said about itself, and where it was unpacked
        "ALTER TABLE plugins ADD COLUMN manifest TEXT",
        "ALTER TABLE plugins ADD COLUMN package_size INTEGER",
        "ALTER TABLE plugins ADD COLUMN path TEXT",
        # apps deleted: work for one still in flight (a run, a message) is discarded, not recorded
        # as an orphan; creating the app again through the API lifts it
        "CREATE TABLE deleted_apps (app_id TEXT PRIMARY KEY, deleted_at REAL NOT NULL)",
    ]
    for statement in statements:
        db.execute(statement)



@migrations(name="0006_queue_samples")
def _queue_samples(db) -> None:
    # each queue's depth every few seconds (beat samples it), for trends; pruned by retention
    db.execute("""
        CREATE TABLE queue_samples (
            at REAL NOT NULL,
            queue TEXT NOT NULL,
            depth INTEGER NOT NULL,
            oldest_age REAL,
            PRIMARY KEY (queue, at)
        ) WITHOUT ROWID""")
    db.execute("CREATE INDEX queue_samples_at ON queue_samples (at)")


@dataclass(frozen=True)
class SchemaState:
    applied: list[str]
    pending: list[str]

    @property
    def current(self) -> bool:
        return not self.pending


def schema_state(database: Database) -> SchemaState:
    with database.connect() as db:
        return SchemaState([m.name for m in migrations.applied(db)], [m.name for m in migrations.pending(db)])


def apply_migrations(database: Database) -> list[str]:
    """Apply every pending migration; returns the names applied (empty when current)."""
    with database.connect() as db:
        # BEGIN IMMEDIATE takes the write lock before reading what is pending; each migration then
        # runs in a savepoint inside it, with the record of it having been applied.
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            pending = [m.name for m in migrations.pending(db)]
            migrations.apply(db)
            db.conn.execute("COMMIT")
        except BaseException:
            if db.conn.in_transaction:
                db.conn.execute("ROLLBACK")
            raise
        return pending
