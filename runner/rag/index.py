"""Datasets, documents and segments in the metadata store, and nearest-segment search.

A document's life, as Dify has it: waiting (uploaded, queued) → parsing (text extracted) →
splitting (cleaned and split; segments stored without vectors) → indexing (segments embedded) →
completed; or error, with a message, from any of them. Every change is also recorded in
document_events, so the whole path a document took can be read back.
"""

from __future__ import annotations

import heapq
import json
import math
from typing import Any, Iterable, Sequence

from runner.rag.embedders import Embedder, embed_checked, pack, text_hash, unpack
from runner.rag.metadata import WORD

STATUSES = ("waiting", "parsing", "splitting", "indexing", "completed", "error")
EMBED_BATCH = 64


def now() -> float:
    import time

    return time.time()


def new_id() -> str:
    import uuid

    return str(uuid.uuid4())


def ensure_dataset(db, dataset_id: str, name: str | None = None, stamp: float | None = None) -> None:
    stamp = stamp or now()
    db.execute("INSERT INTO datasets (id, name, created_at, updated_at) VALUES (?, ?, ?, ?) "
               "ON CONFLICT(id) DO UPDATE SET updated_at = excluded.updated_at",
               [dataset_id, name or dataset_id, stamp, stamp])


def get_dataset(db, dataset_id: str) -> dict | None:
    rows = list(db.query("SELECT * FROM datasets WHERE id = ?", [dataset_id]))
    return rows[0] if rows else None


def get_document(db, document_id: str) -> dict | None:
    rows = list(db.query("SELECT * FROM documents WHERE id = ?", [document_id]))
    return rows[0] if rows else None


def _insert(db, table: str, row: dict) -> None:
    """One row in the caller's transaction (sqlite-utils' insert would commit it on its own)."""
    db.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))


def _update(db, table: str, row_id: str, values: dict) -> None:
    db.execute(f"UPDATE {table} SET {', '.join(f'{column} = ?' for column in values)} WHERE id = ?",
               [*values.values(), row_id])


def create_document(db, dataset_id: str, name: str, *, source: str, file_path: str, file_type: str, size: int,
                    chunk_size: int, chunk_overlap: int, document_id: str | None = None) -> str:
    document_id = document_id or new_id()
    stamp = now()
    _insert(db, "documents", {
        "id": document_id, "dataset_id": dataset_id, "name": name, "status": "waiting", "segment_count": 0,
        "created_at": stamp, "updated_at": stamp, "source": source, "file_path": file_path,
        "file_type": file_type, "size": size, "chunk_size": chunk_size, "chunk_overlap": chunk_overlap})
    _insert(db, "document_events", {"document_id": document_id, "status": "waiting", "at": stamp})
    db.execute("UPDATE datasets SET updated_at = ? WHERE id = ?", [stamp, dataset_id])
    return document_id


def set_status(database, document_id: str, status: str, message: str | None = None, **fields: Any) -> None:
    """Move a document to `status` and record it, in one transaction; `error` is `message` for 'error'."""
    assert status in STATUSES, status
    stamp = now()
    values = {"status": status, "updated_at": stamp, **fields}
    values["error"] = message if status == "error" else None
    if status == "completed":
        values["completed_at"] = stamp
    with database.transaction() as db:
        _update(db, "documents", document_id, values)
        _insert(db, "document_events", {"document_id": document_id, "status": status, "at": stamp,
                                        "message": message})


def history(db, document_id: str) -> list[dict]:
    return [dict(row) for row in db.query(
        "SELECT status, at, message FROM document_events WHERE document_id = ? ORDER BY id", [document_id])]


def _segment_rows(db, rows: Iterable[dict]) -> None:
    rows = list(rows)
    if rows:
        columns = list(rows[0])
        db.conn.executemany(f"INSERT INTO segments ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                            [[row[column] for column in columns] for row in rows])


def replace_segments(database, document: dict, chunks: Sequence[str], metadata: dict) -> None:
    """The document's segments become `chunks`, not yet embedded (an empty vector)."""
    stamp = now()
    with database.transaction() as db:
        db.execute("DELETE FROM segments WHERE document_id = ?", [document["id"]])
        _segment_rows(db, ({
            "id": new_id(), "document_id": document["id"], "dataset_id": document["dataset_id"],
            "position": position, "content": chunk, "embedding": b"", "created_at": stamp,
            "word_count": len(WORD.findall(chunk))} for position, chunk in enumerate(chunks)))
        _update(db, "documents", document["id"], {"segment_count": len(chunks), "updated_at": stamp,
                                                  "metadata": json.dumps(metadata, ensure_ascii=False)})


def _embeddings(database, embedder: Embedder, contents: Sequence[str]) -> tuple[list[bytes], list[list]]:
    """Packed vectors for `contents`, from the embedding cache where the same text was embedded
    before, and the cache rows to add. No write lock is held while the embedder works."""
    keys = [text_hash(content, embedder.name) for content in contents]
    found: dict[str, bytes] = {}
    with database.connect() as db:
        for start in range(0, len(keys), 500):
            part = keys[start:start + 500]
            found.update((row[0], row[1]) for row in db.execute(
                f"SELECT text_hash, embedding FROM embedding_cache WHERE text_hash IN ({','.join('?' * len(part))})",
                part).fetchall())
    missing = list(dict.fromkeys(key for key in keys if key not in found))
    first = {key: index for index, key in reversed(list(enumerate(keys)))}
    stamp = now()
    new_rows = []
    for start in range(0, len(missing), EMBED_BATCH):
        batch = missing[start:start + EMBED_BATCH]
        vectors = embed_checked(embedder, [contents[first[key]] for key in batch])
        for key, vector in zip(batch, vectors, strict=True):
            found[key] = pack(vector)
            new_rows.append([key, found[key], stamp])
    return [found[key] for key in keys], new_rows


def _cache(db, rows: list[list]) -> None:
    db.conn.executemany("INSERT OR IGNORE INTO embedding_cache (text_hash, embedding, created_at) VALUES (?, ?, ?)",
                        rows)


def embed_segments(database, document_id: str, embedder: Embedder) -> int:
    """Embed every segment of the document; returns how many."""
    with database.connect() as db:
        rows = [dict(row) for row in db.query(
            "SELECT id, content FROM segments WHERE document_id = ? ORDER BY position", [document_id])]
    blobs, cache_rows = _embeddings(database, embedder, [row["content"] for row in rows])
    with database.transaction() as db:
        _cache(db, cache_rows)
        db.conn.executemany("UPDATE segments SET embedding = ?, embedding_model = ? WHERE id = ?",
                            [[blob, embedder.name, row["id"]] for row, blob in zip(rows, blobs, strict=True)])
    return len(rows)


def add_segments(database, document_id: str, contents: Sequence[str], embedder: Embedder) -> list[str]:
    """Append segments to a document, embedded at once; returns their ids."""
    blobs, cache_rows = _embeddings(database, embedder, contents)
    stamp = now()
    with database.transaction() as db:
        document = get_document(db, document_id)
        if document is None:
            raise LookupError(f"no document {document_id!r}")
        _cache(db, cache_rows)
        start = db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM segments WHERE document_id = ?",
                           [document_id]).fetchone()[0]
        ids = [new_id() for _ in contents]
        _segment_rows(db, ({
            "id": segment_id, "document_id": document_id, "dataset_id": document["dataset_id"],
            "position": start + offset, "content": content, "embedding": blob, "embedding_model": embedder.name,
            "created_at": stamp, "word_count": len(WORD.findall(content))}
            for offset, (segment_id, content, blob) in enumerate(zip(ids, contents, blobs, strict=True))))
        count = db.execute("SELECT COUNT(*) FROM segments WHERE document_id = ?", [document_id]).fetchone()[0]
        _update(db, "documents", document_id, {"segment_count": count, "updated_at": stamp})
        db.execute("UPDATE datasets SET updated_at = ? WHERE id = ?", [stamp, document["dataset_id"]])
    return ids


def _score(query: Sequence[float], query_norm: float, blob: bytes) -> float:
    vector = unpack(blob)
    if len(vector) != len(query):
        return -2.0
    dot = math.fsum(x * y for x, y in zip(query, vector, strict=True))
    norm = math.sqrt(math.fsum(y * y for y in vector))
    return dot / (query_norm * norm) if query_norm and norm else 0.0


def search(database, dataset_id: str, query: str, top_k: int, embedder: Embedder) -> dict[str, Any]:
    """The `top_k` segments nearest to `query` (cosine similarity) among the dataset's completed
    documents embedded by this embedder; segments of another embedder are counted, not compared."""
    [vector] = embed_checked(embedder, [query])
    query_norm = math.sqrt(math.fsum(x * x for x in vector))
    with database.connect() as db:
        rows: Iterable = db.execute(
            "SELECT s.id, s.document_id, d.name, s.position, s.content, s.embedding, s.embedding_model "
            "FROM segments s JOIN documents d ON d.id = s.document_id "
            "WHERE s.dataset_id = ? AND d.status = 'completed'", [dataset_id])
        other_model = 0
        scored = []
        for segment_id, document_id, name, position, content, blob, model in rows:
            if model != embedder.name:
                other_model += 1
                continue
            scored.append((_score(vector, query_norm, blob), segment_id, document_id, name, position, content))
    best = heapq.nlargest(top_k, scored, key=lambda item: (item[0], -item[4]))
    results = [{"segment_id": segment_id, "document_id": document_id, "document_name": name, "position": position,
                "score": round(score, 6), "content": content}
               for score, segment_id, document_id, name, position, content in best]
    body: dict[str, Any] = {"query": query, "embedder": embedder.name, "results": results}
    if other_model:
        body["skipped_segments"] = other_model
        body["note"] = (f"{other_model} segments were embedded by another embedder than {embedder.name!r}; "
                        "re-index their documents to search them")
    return body
