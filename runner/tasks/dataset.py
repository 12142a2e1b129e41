"""Knowledge base (queues dataset, priority_dataset): indexing documents, and the dataset upkeep
Dify runs from beat. User-triggered indexing goes to priority_dataset, background work to dataset."""

from __future__ import annotations

from typing import Any

from runner import rag, safe_files
from runner.context import AppContext
from runner.rag import files, index
from runner.rag.embedders import EmbedderError, configured_embedder
from runner.tasks.base import DAY, context, new_id, now, task
from runner.tasks.pipeline import prepare_document


def _store_text(ctx: AppContext, dataset_id: str, document_id: str, text: str) -> tuple[str, int]:
    """Keep a text document in the file store like an upload, so it can be re-indexed from it."""
    path = files.document_path(ctx.paths.files, dataset_id, document_id, "txt")
    data = text.encode()
    safe_files.write_atomic(ctx.paths.root, path, data)
    return files.relative_to_store(ctx.paths.files, path), len(data)


def index_segments(ctx: AppContext, document_id: str) -> dict[str, Any]:
    """Embed a split document's segments with the configured embedder: indexing → completed."""
    index.set_status(ctx.database, document_id, "indexing")
    try:
        embedder = configured_embedder(ctx.settings)
        count = index.embed_segments(ctx.database, document_id, embedder)
    except EmbedderError as error:
        index.set_status(ctx.database, document_id, "error", str(error))
        return {"document_id": document_id, "status": "error", "error": str(error)}
    except Exception as error:
        index.set_status(ctx.database, document_id, "error", f"{type(error).__name__}: {error}")
        raise
    index.set_status(ctx.database, document_id, "completed")
    return {"document_id": document_id, "status": "completed", "segments": count, "embedder": embedder.name}


def index_document(ctx: AppContext, dataset_id: str, name: str, text: str,
                   document_id: str | None = None) -> dict[str, Any]:
    """Index a text as a document of `dataset_id` (made if missing), every stage in this task:
    waiting → parsing → splitting → indexing → completed (or error). A task passes its own id as
    the document's, so a retry of it carries on with the same document instead of adding another."""
    files.check_id(dataset_id, "dataset id")
    settings = ctx.settings
    document_id = document_id or index.new_id()
    file_path, size = _store_text(ctx, dataset_id, document_id, text)
    with ctx.database.transaction() as db:
        index.ensure_dataset(db, dataset_id)
        dataset = index.get_dataset(db, dataset_id)
        if not list(db.query("SELECT 1 FROM documents WHERE id = ?", [document_id])):
            index.create_document(
                db, dataset_id, name, source="text", file_path=file_path, file_type="txt", size=size,
                chunk_size=dataset.get("chunk_size") or settings.DIFY_LOCAL_CHUNK_SIZE,
                chunk_overlap=dataset.get("chunk_overlap") if dataset.get("chunk_overlap") is not None
                else settings.DIFY_LOCAL_CHUNK_OVERLAP,
                document_id=document_id)
    prepared = prepare_document(ctx, document_id)
    if prepared is None:
        with ctx.database.connect() as db:
            raise ValueError(index.get_document(db, document_id)["error"])
    indexed = index_segments(ctx, document_id)
    if indexed["status"] != "completed":
        raise ValueError(indexed["error"])
    return {"dataset_id": dataset_id, "document_id": document_id, "status": "completed",
            "segments": indexed["segments"]}


@task("priority_document_indexing_task")
def priority_document_indexing_task(self, dataset_id: str, name: str, text: str) -> dict:
    """Index a text a user just added as a document: clean, split, embed and store its segments."""
    return index_document(context(self), dataset_id, name, text, self.request.id)


@task("document_indexing_task")
def document_indexing_task(self, dataset_id: str, name: str, text: str) -> dict:
    """Index a text as a document in the background (batch imports)."""
    return index_document(context(self), dataset_id, name, text, self.request.id)


@task("priority_document_segments_indexing_task")
def priority_document_segments_indexing_task(self, document_id: str) -> dict:
    """Embed and store the segments of a document a user uploaded (after the priority pipeline)."""
    return index_segments(context(self), document_id)


@task("document_segments_indexing_task")
def document_segments_indexing_task(self, document_id: str) -> dict:
    """Embed and store the segments of a document re-indexed in the background."""
    return index_segments(context(self), document_id)


@task("document_indexing_update_task")
def document_indexing_update_task(self, document_id: str) -> dict:
    """Re-index a stored document in the background: back to waiting, then the normal pipeline."""
    ctx = context(self)
    with ctx.database.connect() as db:
        if index.get_document(db, document_id) is None:
            raise LookupError(f"no document {document_id!r}")
    index.set_status(ctx.database, document_id, "waiting")
    sent = self.app.send_task("document_pipeline_task", args=[document_id])
    return {"document_id": document_id, "status": "waiting", "pipeline_task": sent.id}


@task("batch_create_segment_to_index_task")
def batch_create_segment_to_index_task(self, document_id: str, segments: list) -> dict:
    """Add segments to a document, embedded and searchable at once."""
    ctx = context(self)
    contents = [rag.clean_text(str(content)) for content in segments]
    contents = [content for content in contents if content]
    if not contents:
        return {"document_id": document_id, "added": 0, "segment_ids": []}
    ids = index.add_segments(ctx.database, document_id, contents, configured_embedder(ctx.settings))
    return {"document_id": document_id, "added": len(ids), "segment_ids": ids}


@task("clean_unused_datasets_task")
def clean_unused_datasets_task(self, days: int = 30) -> dict:
    """Remove datasets untouched for `days` days (documents, segments and files), noting each for
    the owner's notice mail."""
    ctx = context(self)
    cutoff = now() - days * DAY
    with ctx.database.transaction() as db:
        stale = list(db.query("SELECT id, name, owner_email FROM datasets WHERE updated_at < ?", [cutoff]))
        for row in stale:
            db["dataset_cleanups"].insert({"dataset_id": row["id"], "dataset_name": row["name"],
                                           "owner_email": row["owner_email"], "cleaned_at": now()})
            db.execute("DELETE FROM datasets WHERE id = ?", [row["id"]])  # documents, segments: ON DELETE CASCADE
    removed_files = 0
    for row in stale:
        folder = files.dataset_folder(ctx.paths.files, row["id"])
        if folder is not None:
            removed_files += safe_files.remove_tree(ctx.paths.root, folder)
    return {"removed": len(stale), "removed_files": removed_files, "older_than_days": days}


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
