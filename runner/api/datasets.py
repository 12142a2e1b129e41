"""The knowledge base: datasets, document uploads and their status, segments, search.

Every request is checked before anything is stored or sent: a bad one gets a 4xx whose message
names the field and what is allowed. Uploaded files go to the state folder's file store under
paths made of ids this API generates (runner.rag.files); the client's file name is only recorded.
The API never imports a task module: work is sent by name, routed by runner.topology.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

from flask import Blueprint, current_app, jsonify, request, url_for

from runner import safe_files, topology
from runner.api.errors import ApiError, error_response
from runner.api.openapi import errors, json_body, json_response
from runner.api.validation import json_body as read_json_body
from runner.errors import StateError
from runner.rag import files, index
from runner.rag.embedders import EmbedderError, configured_embedder
from runner.rag.files import UploadRefused

blueprint = Blueprint("datasets", __name__)

MEGABYTE = 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # bytes a multipart body may carry beyond the file (boundaries, small fields)
MAX_NAME = 100
MAX_DESCRIPTION = 2000
MAX_QUERY = 2000
MAX_TOP_K = 50
MAX_BATCH = 1000
DATASET_FIELDS = ("name", "description", "chunk_size", "chunk_overlap")
TEXT_DOCUMENT_FIELDS = ("name", "text", "chunk_size", "chunk_overlap")
UPLOAD_FORM_FIELDS = ("chunk_size", "chunk_overlap")
SEARCH_FIELDS = ("query", "top_k")
REINDEX_FIELDS = ("chunk_size", "chunk_overlap")
BUSY = ("waiting", "parsing", "splitting", "indexing")
DOCUMENT_COLUMNS = ("id", "dataset_id", "name", "status", "error", "segment_count", "source", "file_type", "size",
                    "chunk_size", "chunk_overlap", "created_at", "updated_at", "completed_at")


# -- what every view shares ------------------------------------------------------------------------

def _context():
    return current_app.extensions["celery"].dify


def _settings():
    return current_app.extensions["dify_settings"]


def _upload_limit() -> int:
    return _settings().UPLOAD_FILE_SIZE_LIMIT * MEGABYTE


def _send(name: str, args: list) -> dict:
    result = current_app.extensions["celery"].send_task(name, args=args)
    return {"id": result.id, "name": name, "queue": topology.ROUTES[name],
            "poll": url_for("tasks.get_task", task_id=result.id)}


def _json_object(fields: tuple[str, ...]) -> dict:
    raw = request.get_data(cache=True)
    if request.mimetype not in ("application/json", "") and raw.strip():
        raise ApiError(415, f"the body must be JSON (Content-Type: application/json), not {request.mimetype!r}")
    body = read_json_body(cache=True)
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object with the fields {', '.join(fields)}", field=None)
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; allowed: {', '.join(fields)}", field=unknown[0])
    return body


def _text(body: dict, field: str, maximum: int, required: bool = False) -> str | None:
    value = body.get(field)
    if value is None:
        if required:
            raise ApiError(400, f"{field!r} is required: a string of 1 to {maximum} characters", field=field)
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > maximum:
        raise ApiError(400, f"{field!r} must be a non-blank string of at most {maximum} characters", field=field)
    return value


def _integer(value: Any, field: str, low: int, high: int) -> int | None:
    """An integer from JSON (a number) or a form (its text), within [low, high]."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            value = None
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"{field!r} must be an integer from {low} to {high}", field=field)
    return value


def _segmenting(source: dict, dataset: dict | None = None) -> tuple[int, int]:
    """(segment size, overlap): the request's, else the dataset's, else the settings' defaults."""
    settings = _settings()
    largest = settings.INDEXING_MAX_SEGMENTATION_TOKENS_LENGTH
    size = _integer(source.get("chunk_size"), "chunk_size", 50, largest)
    overlap = _integer(source.get("chunk_overlap"), "chunk_overlap", 0, largest - 1)
    dataset = dataset or {}
    if size is None:
        size = dataset.get("chunk_size") or settings.DIFY_LOCAL_CHUNK_SIZE
    if overlap is None:
        stored = dataset.get("chunk_overlap")
        overlap = stored if stored is not None else settings.DIFY_LOCAL_CHUNK_OVERLAP
        overlap = min(overlap, size // 2)  # a default overlap follows a smaller segment size asked for
    if overlap >= size:
        raise ApiError(400, f"'chunk_overlap' ({overlap}) must be less than 'chunk_size' ({size})",
                       field="chunk_overlap")
    return size, overlap


def _dataset_id(dataset_id: str) -> str:
    if not files.ID.match(dataset_id):
        raise ApiError(400, "a dataset id is 1 to 64 letters, digits and . _ - (starting with a letter or digit)",
                       field="dataset_id")
    return dataset_id


def _dataset(db, dataset_id: str) -> dict:
    dataset = index.get_dataset(db, _dataset_id(dataset_id))
    if dataset is None:
        raise ApiError(404, f"no dataset {dataset_id!r}; POST /v1/datasets creates one", field="dataset_id")
    return dataset


def _document(db, dataset_id: str, document_id: str) -> dict:
    _dataset(db, dataset_id)
    document = index.get_document(db, document_id) if files.ID.match(document_id) else None
    if document is None or document["dataset_id"] != dataset_id:
        raise ApiError(404, f"no document {document_id!r} in dataset {dataset_id!r}", field="document_id")
    return document


def _dataset_view(db, dataset: dict) -> dict:
    counts = {row["status"]: row["n"] for row in db.query(
        "SELECT status, COUNT(*) AS n FROM documents WHERE dataset_id = ? GROUP BY status", [dataset["id"]])}
    return {"id": dataset["id"], "name": dataset["name"], "description": dataset.get("description"),
            "chunk_size": dataset.get("chunk_size"), "chunk_overlap": dataset.get("chunk_overlap"),
            "documents": sum(counts.values()), "documents_by_status": counts,
            "created_at": dataset["created_at"], "updated_at": dataset["updated_at"]}


def _document_view(db, document: dict, full: bool = False) -> dict:
    view = {column: document.get(column) for column in DOCUMENT_COLUMNS}
    if full:
        view["metadata"] = json.loads(document["metadata"]) if document.get("metadata") else None
        view["history"] = index.history(db, document["id"])
    return view


@blueprint.errorhandler(UploadRefused)
def _refused(error: UploadRefused):
    return error_response(error.status, str(error), field=error.field)


# -- datasets ----------------------------------------------------------------------------------------

@blueprint.post("/v1/datasets")
def create_dataset():
    body = _json_object(DATASET_FIELDS)
    name = _text(body, "name", MAX_NAME, required=True)
    description = _text(body, "description", MAX_DESCRIPTION)
    size, overlap = _segmenting(body)
    dataset_id = index.new_id()
    stamp = index.now()
    with _context().database.transaction() as db:
        db["datasets"].insert({"id": dataset_id, "name": name.strip(), "description": description,
                               "chunk_size": size, "chunk_overlap": overlap, "created_at": stamp,
                               "updated_at": stamp})
        dataset = index.get_dataset(db, dataset_id)
        return jsonify(_dataset_view(db, dataset)), 201


@blueprint.get("/v1/datasets")
def list_datasets():
    with _context().database.connect() as db:
        rows = list(db.query("SELECT * FROM datasets ORDER BY created_at"))
        return jsonify({"datasets": [_dataset_view(db, row) for row in rows]})


@blueprint.get("/v1/datasets/<dataset_id>")
def get_dataset(dataset_id: str):
    with _context().database.connect() as db:
        return jsonify(_dataset_view(db, _dataset(db, dataset_id)))


# -- documents ---------------------------------------------------------------------------------------

@blueprint.before_request
def _upload_size():
    """Uploads may be larger than the API's usual 1 MiB body; everything else keeps that limit."""
    if request.endpoint == "datasets.add_document":
        request.max_content_length = _upload_limit() + MULTIPART_OVERHEAD


def _uploaded_file() -> tuple[Any, str, str, int, dict]:
    """(the file, its name, its type, its size, the form's other fields) of a multipart upload."""
    limit = _upload_limit()
    if request.content_length is not None and request.content_length > limit + MULTIPART_OVERHEAD:
        raise UploadRefused("file", f"the upload is larger than UPLOAD_FILE_SIZE_LIMIT "
                                    f"({_settings().UPLOAD_FILE_SIZE_LIMIT} MB)", status=413)
    unknown = sorted(set(request.form) - set(UPLOAD_FORM_FIELDS)) + \
        sorted(set(request.files) - {"file"})
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; allowed: file, {', '.join(UPLOAD_FORM_FIELDS)}",
                       field=unknown[0])
    uploads = request.files.getlist("file")
    if len(uploads) != 1:
        raise UploadRefused("file", "send exactly one file, as the multipart field 'file'"
                            if uploads else "the multipart field 'file' is missing: send the document as it")
    upload = uploads[0]
    name, file_type = files.check_file_name(upload.filename)
    upload.stream.seek(0, 2)
    size = upload.stream.tell()
    upload.stream.seek(0)
    if size > limit:
        raise UploadRefused("file", f"the file is {size} bytes, more than UPLOAD_FILE_SIZE_LIMIT "
                                    f"({_settings().UPLOAD_FILE_SIZE_LIMIT} MB)", status=413)
    if size == 0:
        raise UploadRefused("file", "the file is empty")
    return upload, name, file_type, size, request.form.to_dict()


@blueprint.post("/v1/datasets/<dataset_id>/documents")
def add_document(dataset_id: str):
    """A document from a multipart upload (field 'file'), or a text as JSON {"name", "text"}; 202
    with the pipeline task on priority_pipeline (a user's upload)."""
    ctx = _context()
    with ctx.database.connect() as db:
        dataset = _dataset(db, dataset_id)
    if request.mimetype == "multipart/form-data":
        upload, name, file_type, size, form = _uploaded_file()
        data = None
        options = form
    elif request.mimetype in ("application/json", ""):
        body = _json_object(TEXT_DOCUMENT_FIELDS)
        text = _text(body, "text", _upload_limit(), required=True)
        name = _text(body, "name", files.MAX_NAME_BYTES) or "text.txt"
        files.check_file_name(name)
        upload, file_type, data, options = None, "txt", text.encode(), body
        size = len(data)
        if size > _upload_limit():
            raise UploadRefused("text", f"the text is {size} bytes in UTF-8, more than UPLOAD_FILE_SIZE_LIMIT "
                                        f"({_settings().UPLOAD_FILE_SIZE_LIMIT} MB)", status=413)
    else:
        raise ApiError(415, f"send the document as multipart/form-data (field 'file') or a text as JSON "
                            f"{{\"name\", \"text\"}}, not {request.mimetype!r}")
    size_setting, overlap = _segmenting(options, dataset)
    document_id = index.new_id()
    path = files.document_path(ctx.paths.files, dataset_id, document_id, file_type)
    try:
        with safe_files.open_file(ctx.paths.root, path, "xb") as out:  # never through a link in the state folder
            if upload is not None:
                upload.save(out)
            else:
                out.write(data)
        with ctx.database.transaction() as db:
            index.create_document(db, dataset_id, name, source="upload" if upload is not None else "text",
                                  file_path=files.relative_to_store(ctx.paths.files, path), file_type=file_type,
                                  size=size, chunk_size=size_setting, chunk_overlap=overlap,
                                  document_id=document_id)
    except BaseException:
        with contextlib.suppress(OSError, StateError):  # the error that got here says what is wrong
            safe_files.remove(ctx.paths.root, path)
        raise
    with ctx.database.connect() as db:  # as queued: the worker may have moved it on before we answer
        document = _document_view(db, index.get_document(db, document_id))
    try:
        task = _send("priority_document_pipeline_task", [document_id])
    except Exception as error:
        index.set_status(ctx.database, document_id, "error", f"the document could not be queued: {error}")
        raise
    document["poll"] = url_for("datasets.get_document", dataset_id=dataset_id, document_id=document_id)
    return jsonify({"document": document, "task": task}), 202


@blueprint.get("/v1/datasets/<dataset_id>/documents")
def list_documents(dataset_id: str):
    with _context().database.connect() as db:
        _dataset(db, dataset_id)
        rows = list(db.query("SELECT * FROM documents WHERE dataset_id = ? ORDER BY created_at", [dataset_id]))
        return jsonify({"documents": [_document_view(db, row) for row in rows]})


@blueprint.get("/v1/datasets/<dataset_id>/documents/<document_id>")
def get_document(dataset_id: str, document_id: str):
    with _context().database.connect() as db:
        return jsonify(_document_view(db, _document(db, dataset_id, document_id), full=True))


@blueprint.get("/v1/datasets/<dataset_id>/documents/<document_id>/segments")
def list_segments(dataset_id: str, document_id: str):
    limit = _integer(request.args.get("limit"), "limit", 1, 1000) or 100
    offset = _integer(request.args.get("offset"), "offset", 0, 10**9) or 0
    with _context().database.connect() as db:
        _document(db, dataset_id, document_id)
        rows = [dict(row) for row in db.query(
            "SELECT id, position, content, word_count, embedding_model, length(embedding) > 0 AS embedded "
            "FROM segments WHERE document_id = ? ORDER BY position LIMIT ? OFFSET ?", [document_id, limit, offset])]
    for row in rows:
        row["embedded"] = bool(row["embedded"])
    return jsonify({"segments": rows, "limit": limit, "offset": offset})


@blueprint.post("/v1/datasets/<dataset_id>/documents/<document_id>/segments")
def add_segments(dataset_id: str, document_id: str):
    """Batch add: {"segments": ["text", {"content": "text"}, …]}; 202 with the task on the dataset queue."""
    body = _json_object(("segments",))
    segments = body.get("segments")
    largest = _settings().INDEXING_MAX_SEGMENTATION_TOKENS_LENGTH
    if not isinstance(segments, list) or not 1 <= len(segments) <= MAX_BATCH:
        raise ApiError(400, f"'segments' must be an array of 1 to {MAX_BATCH} segments", field="segments")
    contents = []
    for position, segment in enumerate(segments):
        content = segment.get("content") if isinstance(segment, dict) and set(segment) <= {"content"} else segment
        if not isinstance(content, str) or not content.strip() or len(content) > largest:
            raise ApiError(400, f"'segments[{position}]' must be a non-blank string (or {{\"content\": string}}) "
                                f"of at most {largest} characters", field=f"segments[{position}]")
        contents.append(content)
    with _context().database.connect() as db:
        document = _document(db, dataset_id, document_id)
    if document["status"] != "completed":
        raise ApiError(409, f"document {document_id!r} is {document['status']}; segments can be added once it "
                            "is completed", field="document_id")
    return jsonify({"document_id": document_id, "segments": len(contents),
                    "task": _send("batch_create_segment_to_index_task", [document_id, contents])}), 202


@blueprint.post("/v1/datasets/<dataset_id>/documents/<document_id>/reindex")
def reindex_document(dataset_id: str, document_id: str):
    """Background re-indexing (the normal queues), optionally with another segment size or overlap."""
    body = _json_object(REINDEX_FIELDS)
    ctx = _context()
    with ctx.database.connect() as db:
        document = _document(db, dataset_id, document_id)
        dataset = index.get_dataset(db, dataset_id)
    if document["status"] in BUSY:
        raise ApiError(409, f"document {document_id!r} is {document['status']}; re-index it once it is completed "
                            "or failed", field="document_id")
    current = {"chunk_size": document["chunk_size"], "chunk_overlap": document["chunk_overlap"]}
    size, overlap = _segmenting({**current, **{k: v for k, v in body.items() if v is not None}}, dataset)
    with ctx.database.transaction() as db:
        db["documents"].update(document_id, {"chunk_size": size, "chunk_overlap": overlap, "updated_at": index.now()})
    return jsonify({"document_id": document_id, "chunk_size": size, "chunk_overlap": overlap,
                    "task": _send("document_indexing_update_task", [document_id])}), 202


# -- search ------------------------------------------------------------------------------------------

@blueprint.post("/v1/datasets/<dataset_id>/search")
def search(dataset_id: str):
    body = _json_object(SEARCH_FIELDS)
    query = _text(body, "query", MAX_QUERY, required=True)
    top_k = _integer(body.get("top_k"), "top_k", 1, MAX_TOP_K) or 5
    ctx = _context()
    with ctx.database.connect() as db:
        _dataset(db, dataset_id)
    try:
        embedder = configured_embedder(_settings())
    except EmbedderError as error:
        raise ApiError(503, f"the embedder cannot be loaded: {error}") from None
    return jsonify({"dataset_id": dataset_id, **index.search(ctx.database, dataset_id, query, top_k, embedder)})


# -- the routes' OpenAPI description (runner.api.openapi) ---------------------------------------------

SEGMENTING = {"chunk_size": {"type": "integer", "minimum": 1, "description": "segment size, in characters"},
              "chunk_overlap": {"type": "integer", "minimum": 0, "description": "characters shared by neighbours"}}
DATASET_ID = {"name": "dataset_id", "in": "path", "required": True, "schema": {"type": "string"}}
DOCUMENT_ID = {"name": "document_id", "in": "path", "required": True, "schema": {"type": "string"}}
PATHS = {
    "/v1/datasets": {
        "get": {"summary": "The datasets (knowledge bases)", "operationId": "listDatasets",
                "responses": {"200": json_response("the datasets")}},
        "post": {"summary": "Create a dataset", "operationId": "createDataset",
                 "requestBody": json_body({"type": "object", "required": ["name"], "additionalProperties": False,
                                           "properties": {"name": {"type": "string", "maxLength": MAX_NAME},
                                                          "description": {"type": "string",
                                                                          "maxLength": MAX_DESCRIPTION},
                                                          **SEGMENTING}}),
                 "responses": {"201": json_response("created"), **errors(400, 413)}}},
    "/v1/datasets/{dataset_id}": {
        "parameters": [DATASET_ID],
        "get": {"summary": "A dataset and its document counts", "operationId": "getDataset",
                "responses": {"200": json_response("the dataset"), **errors(400, 404)}}},
    "/v1/datasets/{dataset_id}/documents": {
        "parameters": [DATASET_ID],
        "get": {"summary": "The dataset's documents and their status", "operationId": "listDocuments",
                "responses": {"200": json_response("the documents"), **errors(400, 404)}},
        "post": {"summary": "Add a document: a file (multipart, field `file`: txt, md, html, csv, json, pdf, "
                            "docx) or a text as JSON; it goes waiting → parsing → splitting → indexing → "
                            "completed on the priority queues",
                 "operationId": "addDocument",
                 "requestBody": {"required": True, "content": {
                     "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                         "file": {"type": "string", "format": "binary"}, **SEGMENTING}}},
                     "application/json": {"schema": {"type": "object", "required": ["text"],
                                                     "additionalProperties": False, "properties": {
                                                         "name": {"type": "string"}, "text": {"type": "string"},
                                                         **SEGMENTING}}}}},
                 "responses": {"202": json_response("accepted: poll the document"),
                               **errors(400, 404, 413, 415)}}},
    "/v1/datasets/{dataset_id}/documents/{document_id}": {
        "parameters": [DATASET_ID, DOCUMENT_ID],
        "get": {"summary": "A document: status and its history, error, metadata", "operationId": "getDocument",
                "responses": {"200": json_response("the document"), **errors(400, 404)}}},
    "/v1/datasets/{dataset_id}/documents/{document_id}/segments": {
        "parameters": [DATASET_ID, DOCUMENT_ID],
        "get": {"summary": "The document's segments", "operationId": "listSegments",
                "responses": {"200": json_response("the segments"), **errors(400, 404)}},
        "post": {"summary": "Add segments in a batch (indexed on the dataset queue)", "operationId": "addSegments",
                 "requestBody": json_body({"type": "object", "required": ["segments"], "additionalProperties": False,
                                           "properties": {"segments": {
                                               "type": "array", "minItems": 1, "maxItems": MAX_BATCH,
                                               "items": {"oneOf": [
                                                   {"type": "string"},
                                                   {"type": "object", "required": ["content"],
                                                    "properties": {"content": {"type": "string"}}}]}}}}),
                 "responses": {"202": json_response("accepted"), **errors(400, 404, 409, 413)}}},
    "/v1/datasets/{dataset_id}/documents/{document_id}/reindex": {
        "parameters": [DATASET_ID, DOCUMENT_ID],
        "post": {"summary": "Index the document again (normal queues), optionally with another segmenting",
                 "operationId": "reindexDocument",
                 "requestBody": json_body({"type": "object", "additionalProperties": False,
                                           "properties": SEGMENTING}, required=False),
                 "responses": {"202": json_response("accepted"), **errors(400, 404, 409, 413)}}},
    "/v1/datasets/{dataset_id}/search": {
        "parameters": [DATASET_ID],
        "post": {"summary": "The segments nearest to a query", "operationId": "searchDataset",
                 "requestBody": json_body({"type": "object", "required": ["query"], "additionalProperties": False,
                                           "properties": {"query": {"type": "string", "maxLength": MAX_QUERY},
                                                          "top_k": {"type": "integer", "minimum": 1,
                                                                    "maximum": MAX_TOP_K}}}),
                 "responses": {"200": json_response("the nearest segments, best first"),
                               **errors(400, 404, 413, 503)}}},
}
