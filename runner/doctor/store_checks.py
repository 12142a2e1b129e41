"""Checks on the metadata store: migrations current; no document stuck on its way to completed.

Both read the database without creating or changing it (a missing file stays missing), and wait
at most a couple of seconds for a lock another process holds.
"""

from __future__ import annotations

import time

import sqlite_utils

from runner.doctor.context import FAIL, PASS, SKIP, Context, Result
from runner.state import StatePaths
from runner.store.database import Database, PoolLimits

LOCK_WAIT = 2  # seconds to wait for a database another process is writing
IN_PROGRESS = ("waiting", "parsing", "splitting", "indexing")  # runner.rag.index.STATUSES before completed
MAX_LISTED = 5
# where a document's tasks run: extraction and splitting, then indexing (runner.topology.ROUTES)
DOCUMENT_QUEUES = ("priority_pipeline", "pipeline", "priority_dataset", "dataset")


def _database(ctx: Context) -> Database | None:
    path = StatePaths(ctx.settings.state_dir).database
    if not path.exists():
        return None
    return ctx.once("database", lambda: Database(path, PoolLimits(size=2, overflow=0, recycle=-1, timeout=LOCK_WAIT)))


# -- 2. migrations -----------------------------------------------------------------------------------

NOT_OURS = ("skipped: this project's Procfile runs no dify-local api, worker or beat, so dify-local's own "
            "database does not apply")


def check_migrations(ctx: Context) -> Result:
    from runner.store.migrations import migrations, schema_state

    if not ctx.runs_our_backend():
        return Result("migrations", SKIP, NOT_OURS)

    path = StatePaths(ctx.settings.state_dir).database
    database = _database(ctx)
    if database is None:
        names = [migration.name for migration in migrations.pending(sqlite_utils.Database(memory=True))]
        return Result("migrations", FAIL, f"no database yet at {path}: all {len(names)} migrations pending",
                      fix="`dify-local migrate` (the API and worker also migrate when they start, "
                          "with MIGRATION_ENABLED=true)", data={"path": str(path), "pending": names})
    state = schema_state(database)
    data = {"path": str(path), "applied": state.applied, "pending": state.pending}
    if state.pending:
        return Result("migrations", FAIL,
                      f"{len(state.pending)} migration(s) pending in {path}: {', '.join(state.pending)}",
                      fix="`dify-local migrate`; the processes refuse an old schema with MIGRATION_ENABLED=false",
                      data=data)
    return Result("migrations", PASS, f"all {len(state.applied)} migrations applied ({path})", data=data)


# -- 6. documents stuck ------------------------------------------------------------------------------

def check_documents(ctx: Context) -> Result:
    if not ctx.runs_our_backend():
        return Result("documents", SKIP, NOT_OURS)
    minutes = ctx.settings.DIFY_LOCAL_STUCK_DOCUMENT_MINUTES
    threshold = minutes * 60
    database = _database(ctx)
    if database is None:
        return Result("documents", SKIP, "skipped: no database yet (see migrations)")
    marks = ", ".join("?" * len(IN_PROGRESS))
    since = time.time() - threshold
    with database.connect() as db:
        if not db["documents"].exists():
            return Result("documents", SKIP, "skipped: the database has no documents table yet (see migrations)")
        count = db.execute(f"SELECT COUNT(*) FROM documents WHERE status IN ({marks}) AND updated_at < ?",
                           [*IN_PROGRESS, since]).fetchone()[0]
        rows = [dict(row) for row in db.query(
            f"SELECT d.id, d.name, d.status, d.updated_at, d.dataset_id, ds.name AS dataset "
            f"FROM documents d LEFT JOIN datasets ds ON ds.id = d.dataset_id "
            f"WHERE d.status IN ({marks}) AND d.updated_at < ? ORDER BY d.updated_at LIMIT ?",
            [*IN_PROGRESS, since, MAX_LISTED])]
    limit = _minutes(minutes)
    if not count:
        return Result("documents", PASS, f"no document waiting, parsing, splitting or indexing for over {limit}",
                      data={"stuck": 0, "minutes": minutes})
    now = time.time()
    lines = [f"{row['name']} ({row['id']}) in dataset {row['dataset'] or '?'} ({row['dataset_id']}): "
             f"{row['status']} for {_minutes((now - row['updated_at']) / 60)}" for row in rows]
    if count > len(rows):
        lines.append(f"… and {count - len(rows)} more")
    return Result(
        "documents", FAIL, f"{count} document(s) stuck waiting, parsing, splitting or indexing for over {limit}",
        fix=_documents_fix(ctx), lines=lines, data={"stuck": count, "minutes": minutes, "documents": rows})


def _documents_fix(ctx: Context) -> str:
    """Why documents may not move, from what the broker and the workers say."""
    from runner.monitor.workers import consumers_by_queue

    if not ctx.broker_ok():
        return "nothing moves while the broker does not answer: fix that first (see broker)"
    try:
        consumed = consumers_by_queue(ctx.workers().queues_of)
    except Exception:
        consumed = {}
    if not consumed:
        return f"no worker consumes their queues ({', '.join(DOCUMENT_QUEUES)}): start one (see worker)"
    missing = [queue for queue in DOCUMENT_QUEUES if queue not in consumed]
    if missing:
        return f"no live worker consumes {', '.join(missing)}: run one on them (see consumers)"
    return ("their queues have consumers: a document may wait behind a long queue, or a large file still be "
            "indexing; a task cut off by a stopped worker runs again from its queue, but one whose message "
            "was lost (a purged queue) does not: upload that document again")


def _minutes(value: float) -> str:
    if value < 1:
        return f"{value * 60:.0f} s"
    if value < 120:
        return f"{value:.0f} min"
    return f"{value / 60:.1f} h"
