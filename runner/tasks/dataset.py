"""Knowledge base (queues dataset, priority_dataset): indexing documents, and the dataset upkeep
Dify runs from beat. User-triggered indexing goes to priority_dataset, background work to dataset."""

from __future__ import annotations

from typing import Any

from runner import rag
from runner.context import AppContext
from runner.tasks.base import DAY, context, new_id, now, task

SEGMENT_SIZE = 500
SEGMENT_OVERLAP = 50


def _embedding(db, content: str) -> bytes:
    """The segment's embedding, from the cache when the same text was embedded before."""
    digest = rag.text_hash(content)
    row = db.execute("SELECT embedding FROM embedding_cache WHERE text_hash = ?", [digest]).fetchone()
    if row:
        return row[0]
    blob = rag.pack(rag.embed(content))
    db.execute("INSERT OR IGNORE INTO embedding_cache (text_hash, embedding, created_at) VALUES (?, ?, ?)",
               [digest, blob, now()])
    return blob


def _set_status(ctx: AppContext, document_id: str, status: str, **fields: Any) -> None:
    with ctx.database.transaction() as db:
        db["documents"].update(document_id, {"status": status, "updated_at": now(), **fields})


def index_document(ctx: AppContext, dataset_id: str, name: str, text: str) -> dict[str, Any]:
    """Dify's statuses in order: waiting → parsing → splitting → indexing → completed (or error)."""
    document_id = new_id()
    stamp = now()
    with ctx.database.transaction() as db:
        db.execute("INSERT INTO datasets (id, name, created_at, updated_at) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT(id) DO UPDATE SET updated_at = excluded.updated_at",
                   [dataset_id, dataset_id, stamp, stamp])
        db["documents"].insert({"id": document_id, "dataset_id": dataset_id, "name": name, "status": "waiting",
                                "segment_count": 0, "created_at": stamp, "updated_at": stamp})
    try:
        _set_status(ctx, document_id, "parsing")
        cleaned = rag.clean_text(text)
        _set_status(ctx, document_id, "splitting")
        chunks = rag.chunk_text(cleaned, SEGMENT_SIZE, SEGMENT_OVERLAP)
        if not chunks:
            raise ValueError("the document has no text to index")
        _set_status(ctx, document_id, "indexing")
        with ctx.database.transaction() as db:
            rows = [{"id": new_id(), "document_id": document_id, "dataset_id": dataset_id, "position": position,
                     "content": chunk, "embedding": _embedding(db, chunk), "created_at": now()}
                    for position, chunk in enumerate(chunks)]
            db["segments"].insert_all(rows)
            db["documents"].update(document_id, {"status": "completed", "segment_count": len(rows),
                                                 "updated_at": now(), "completed_at": now()})
    except Exception as error:
        _set_status(ctx, document_id, "error", error=f"{type(error).__name__}: {error}")
        raise
    return {"dataset_id": dataset_id, "document_id": document_id, "status": "completed", "segments": len(chunks)}


@task("priority_document_indexing_task")
def priority_document_indexing_task(self, dataset_id: str, name: str, text: str) -> dict:
    """Index a document a user just added: clean, split, embed and store its segments."""
    return index_document(context(self), dataset_id, name, text)


@task("document_indexing_task")
def document_indexing_task(self, dataset_id: str, name: str, text: str) -> dict:
    """Index a document in the background (re-indexing, batch imports)."""
    return index_document(context(self), dataset_id, name, text)


@task("clean_unused_datasets_task")
def clean_unused_datasets_task(self, days: int = 30) -> dict:
    """Remove datasets untouched for `days` days, noting each for the owner's notice mail."""
    cutoff = now() - days * DAY
    with context(self).database.transaction() as db:
        stale = list(db.query("SELECT id, name, owner_email FROM datasets WHERE updated_at < ?", [cutoff]))
        for row in stale:
            db["dataset_cleanups"].insert({"dataset_id": row["id"], "dataset_name": row["name"],
                                           "owner_email": row["owner_email"], "cleaned_at": now()})
            db.execute("DELETE FROM datasets WHERE id = ?", [row["id"]])
    return {"removed": len(stale), "older_than_days": days}


@task("create_tidb_serverless_task")
def create_tidb_serverless_task(self, pool_size: int = 3) -> dict:
    """Keep the local stand-in pool of vector-store instances topped up to `pool_size`."""
    with context(self).database.transaction() as db:
        have = db.execute("SELECT COUNT(*) FROM vector_store_instances WHERE status IN ('creating', 'active')"
                          ).fetchone()[0]
        created = max(0, pool_size - have)
        stamp = now()
        db["vector_store_instances"].insert_all(
            {"id": new_id(), "status": "creating", "created_at": stamp, "updated_at": stamp} for _ in range(created))
    return {"created": created, "pool_size": pool_size}


@task("update_tidb_serverless_status_task")
def update_tidb_serverless_status_task(self) -> dict:
    """Mark instances that finished creating as active (local instances are ready at once)."""
    with context(self).database.transaction() as db:
        cursor = db.execute("UPDATE vector_store_instances SET status = 'active', updated_at = ? "
                            "WHERE status = 'creating'", [now()])
    return {"activated": cursor.rowcount}
