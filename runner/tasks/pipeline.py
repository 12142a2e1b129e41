"""Document pipeline (queues pipeline, priority_pipeline): extraction → cleaning → splitting →
metadata, then a hand-off to the dataset queues for embedding. User-triggered runs (uploads) go to
priority_pipeline and hand off to priority_dataset; background re-indexing uses the normal queues."""

from __future__ import annotations

from typing import Any

from runner import rag, safe_files
from runner.context import AppContext
from runner.errors import StateError
from runner.rag import index
from runner.rag.extract import MEGABYTE, ExtractionError, ExtractionLimits, extract_data
from runner.rag.files import stored_path
from runner.rag.metadata import document_metadata
from runner.tasks.base import context, task


def run_pipeline(text: str, chunk_size: int, overlap: int) -> dict:
    cleaned = rag.clean_text(text)
    chunks = rag.chunk_text(cleaned, chunk_size, overlap)
    return {"chunks": chunks, "metadata": {**rag.text_metadata(cleaned), "chunks": len(chunks)}}


def _stored_file(ctx: AppContext, relative: str, limits: ExtractionLimits) -> bytes:
    """An uploaded file's content, read without following a link in the state folder."""
    try:
        return safe_files.read_bytes(ctx.paths.root, stored_path(ctx.paths.files, relative),
                                     limits.max_file_mb * MEGABYTE, "an uploaded document (UPLOAD_FILE_SIZE_LIMIT)")
    except (StateError, ValueError) as error:
        raise ExtractionError(str(error)) from None
    except OSError as error:
        raise ExtractionError(f"the uploaded file cannot be read: {error.strerror}") from None


def prepare_document(ctx: AppContext, document_id: str) -> dict[str, Any] | None:
    """Parse, clean, split and describe a stored document; its segments are stored unembedded.

    Returns None when the document failed (its status is then `error`, with the reason): a file
    that cannot be read fails the same way however often it is tried, so it is not raised.
    """
    with ctx.database.connect() as db:
        document = index.get_document(db, document_id)
    if document is None:
        raise LookupError(f"no document {document_id!r}")
    index.set_status(ctx.database, document_id, "parsing")
    try:
        limits = ExtractionLimits.from_settings(ctx.settings)
        extracted = extract_data(_stored_file(ctx, document["file_path"], limits), document["file_type"], limits)
        index.set_status(ctx.database, document_id, "splitting")
        cleaned = rag.clean_text(extracted.text)
        chunks = rag.chunk_text(cleaned, document["chunk_size"], document["chunk_overlap"])
        if not chunks:
            raise ExtractionError("the document has no text to index")
        metadata = document_metadata(cleaned, extracted.metadata, document["file_type"], document["size"] or 0)
        index.replace_segments(ctx.database, document, chunks, {**metadata, "segments": len(chunks)})
    except (ExtractionError, ValueError) as error:
        index.set_status(ctx.database, document_id, "error", str(error))
        return None
    except Exception as error:
        index.set_status(ctx.database, document_id, "error", f"{type(error).__name__}: {error}")
        raise
    return {"document_id": document_id, "segments": len(chunks), "metadata": metadata}


def _pipeline(bound_task: Any, document_id: str, next_task: str) -> dict:
    prepared = prepare_document(context(bound_task), document_id)
    if prepared is None:
        with context(bound_task).database.connect() as db:
            document = index.get_document(db, document_id)
        return {"document_id": document_id, "status": "error", "error": document["error"]}
    handed = bound_task.app.send_task(next_task, args=[document_id])
    return {**prepared, "status": "splitting", "indexing_task": handed.id, "indexing_queue_task": next_task}


@task("priority_document_pipeline_task")
def priority_document_pipeline_task(self, document_id: str) -> dict:
    """Extract, clean and split a document a user just uploaded, then queue its indexing (priority)."""
    return _pipeline(self, document_id, "priority_document_segments_indexing_task")


@task("document_pipeline_task")
def document_pipeline_task(self, document_id: str) -> dict:
    """Extract, clean and split a stored document in the background, then queue its indexing."""
    return _pipeline(self, document_id, "document_segments_indexing_task")


@task("priority_rag_pipeline_run_task")
def priority_rag_pipeline_run_task(self, text: str, chunk_size: int = 500, overlap: int = 50) -> dict:
    """Clean and chunk a text a user just submitted."""
    return run_pipeline(text, chunk_size, overlap)


@task("rag_pipeline_run_task")
def rag_pipeline_run_task(self, text: str, chunk_size: int = 500, overlap: int = 50) -> dict:
    """Clean and chunk a text in the background."""
    return run_pipeline(text, chunk_size, overlap)
