"""Document pipeline (queues pipeline, priority_pipeline): extraction → cleaning → chunking →
metadata. User-triggered runs go to priority_pipeline."""

from __future__ import annotations

from runner import rag
from runner.tasks.base import task


def run_pipeline(text: str, chunk_size: int, overlap: int) -> dict:
    cleaned = rag.clean_text(text)
    chunks = rag.chunk_text(cleaned, chunk_size, overlap)
    return {"chunks": chunks, "metadata": {**rag.text_metadata(cleaned), "chunks": len(chunks)}}


@task("priority_rag_pipeline_run_task")
def priority_rag_pipeline_run_task(self, text: str, chunk_size: int = 500, overlap: int = 50) -> dict:
    """Clean and chunk a text a user just submitted."""
    return run_pipeline(text, chunk_size, overlap)


@task("rag_pipeline_run_task")
def rag_pipeline_run_task(self, text: str, chunk_size: int = 500, overlap: int = 50) -> dict:
    """Clean and chunk a text in the background."""
    return run_pipeline(text, chunk_size, overlap)
