"""The knowledge base through a running stack: uploads of every supported type reach `completed`
through Dify's statuses and are found by search; bad uploads are refused with a message; a file
that cannot be read ends in `error`; batch segments, re-indexing on the normal queues, search
ranking and the clean-up of unused datasets. Real files: PDFs written by fpdf2, DOCX by python-docx."""

from __future__ import annotations

import io
import json
import sqlite3
import uuid

import docx
import pytest
from fpdf import FPDF

from runner.rag import extract, files
from tests.helpers import REPO, wait_until

SEED = REPO / "tests" / "support" / "dify_celery_seed.md"  # Dify's Celery page (the design's source), in Chinese
STATUSES = ["waiting", "parsing", "splitting", "indexing", "completed"]
FILLER = "This paragraph is filler about nothing in particular, written to make the document longer. "


# -- building real files ----------------------------------------------------------------------------

def pdf_bytes(text: str, title: str = "") -> bytes:
    pdf = FPDF()
    if title:
        pdf.set_title(title)
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


def docx_bytes(paragraphs: list[str], title: str = "") -> bytes:
    document = docx.Document()
    if title:
        document.core_properties.title = title
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text, table.rows[0].cells[1].text = "cell", "tabulated"
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


# One word per file that no other file has: search for it must return that file first.
DOCUMENTS = {
    "notes.txt": ("zebra", lambda w: f"Plain notes. The {w} crossed the savanna at dawn.\n\n{FILLER * 3}".encode()),
    "guide.md": ("quokka", lambda w: f"# Field guide\n\nThe **{w}** smiles on [Rottnest](http://x).\n\n"
                                     f"- {FILLER}\n".encode()),
    "page.html": ("narwhal", lambda w: f"<html><head><title>Sea</title><style>p {{color: red}}</style></head>"
                                       f"<body><p>The {w} has a long tusk.</p><script>var hidden = 1;</script>"
                                       f"<p>{FILLER}</p></body></html>".encode()),
    "table.csv": ("axolotl", lambda w: f"animal,habitat\n{w},Mexican lakes\nsparrow,{FILLER}\n".encode()),
    "data.json": ("pangolin", lambda w: json.dumps({"animals": [{"name": w, "armour": "scales"}],
                                                    "note": FILLER}).encode()),
    "report.pdf": ("okapi", lambda w: pdf_bytes(f"The {w} lives in the Ituri rainforest. {FILLER * 2}", "Okapi")),
    "memo.docx": ("wombat", lambda w: docx_bytes([f"The {w} digs burrows.", FILLER], "Memo on burrows")),
}


def multipart(fields: dict[str, str], file_name: str | None, content: bytes) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    if file_name is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def upload(project, dataset_id: str, file_name: str | None, content: bytes, **fields: str) -> tuple[int, dict]:
    raw, headers = multipart(fields, file_name, content)
    return project.api.request("POST", f"/v1/datasets/{dataset_id}/documents", raw=raw, headers=headers)


def create_dataset(project, **fields) -> str:
    status, body = project.api.post("/v1/datasets", {"name": "animals", **fields})
    assert status == 201, body
    return body["id"]


def settled(project, dataset_id: str, document_id: str, timeout: float = 60) -> dict:
    """The document once it is completed or in error."""
    def done():
        status, body = project.api.get(f"/v1/datasets/{dataset_id}/documents/{document_id}")
        assert status == 200, body
        return body if body["status"] in ("completed", "error") else None
    return wait_until(done, timeout, f"document {document_id} to finish")


def task_result(project, task: dict, timeout: float = 60) -> dict:
    def finished():
        status, body = project.api.get(task["poll"])
        assert status == 200 and body["state"] != "FAILURE", body
        return body if body["state"] == "SUCCESS" else None
    return wait_until(finished, timeout, f"task {task['name']} to succeed")


def search(project, dataset_id: str, query: str, top_k: int = 3) -> list[dict]:
    status, body = project.api.post(f"/v1/datasets/{dataset_id}/search", {"query": query, "top_k": top_k})
    assert status == 200, body
    return body["results"]


# -- through the stack ------------------------------------------------------------------------------

def test_every_file_type_is_uploaded_indexed_and_found(project):
    project.up()
    dataset_id = create_dataset(project, chunk_size=200, chunk_overlap=20)
    uploaded = {}
    for name, (word, make) in DOCUMENTS.items():
        status, body = upload(project, dataset_id, name, make(word))
        assert status == 202, body
        assert body["document"]["status"] == "waiting" and body["document"]["name"] == name
        assert body["task"]["queue"] == "priority_pipeline"  # a user's upload: the priority queues
        uploaded[name] = body["document"]["id"]

    for name, document_id in uploaded.items():
        document = settled(project, dataset_id, document_id)
        assert document["status"] == "completed", (name, document)
        assert [event["status"] for event in document["history"]] == STATUSES, (name, document["history"])
        assert document["segment_count"] >= 1 and document["metadata"]["segments"] == document["segment_count"]
        assert document["chunk_size"] == 200 and document["chunk_overlap"] == 20

    for name, (word, _) in DOCUMENTS.items():
        results = search(project, dataset_id, f"where does the {word} live")
        assert results and results[0]["document_name"] == name, (word, results)
        assert word in results[0]["content"].lower()

    metadata = {name: settled(project, dataset_id, uploaded[name])["metadata"] for name in uploaded}
    assert metadata["report.pdf"]["pages"] == 1 and metadata["report.pdf"]["title"] == "Okapi"
    assert metadata["memo.docx"]["title"] == "Memo on burrows"
    assert metadata["page.html"]["title"] == "Sea" and metadata["guide.md"]["title"] == "Field guide"
    assert metadata["table.csv"]["rows"] == 2 and "axolotl" in metadata["table.csv"]["keywords"]
    html = search(project, dataset_id, "narwhal tusk")[0]["content"]
    assert "hidden" not in html and "color" not in html  # scripts and styles are not text
    # the segments came through the priority pipeline and the priority dataset queue
    def priority_queues():  # task runs are recorded in batches, a moment after they finish
        with sqlite3.connect(project.database) as db:
            return {row[0] for row in db.execute("SELECT queue FROM task_runs WHERE name LIKE 'priority_document_%'")}
    wait_until(lambda: priority_queues() == {"priority_pipeline", "priority_dataset"}, 10, "the tasks' runs")
    status, listed = project.api.get(f"/v1/datasets/{dataset_id}/documents")
    assert status == 200 and len(listed["documents"]) == len(DOCUMENTS)
    # the files are in the file store under generated ids, not under the names sent
    stored = sorted(p.name for p in (project.state / "files" / "datasets" / dataset_id).iterdir())
    assert len(stored) == len(DOCUMENTS) and not set(stored) & set(DOCUMENTS)


def test_the_chinese_seed_document_is_searchable(project):
    project.up()
    dataset_id = create_dataset(project)
    status, body = upload(project, dataset_id, "celery.md", SEED.read_bytes())
    assert status == 202, body
    document = settled(project, dataset_id, body["document"]["id"])
    assert document["status"] == "completed" and document["segment_count"] > 10, document
    assert document["metadata"]["title"] == "使用 Celery 进行异步任务处理"
    assert document["metadata"]["letters"]["cjk"] > 1000
    for query, expected in [("移除未使用的知识库", "clean_unused_datasets_task"),
                            ("clean_unused_datasets_task", "clean_unused_datasets_task"),
                            ("Worker 内存限制", "内存限制"), ("CELERY_SENTINEL_MASTER_NAME", "Sentinel")]:
        results = search(project, dataset_id, query)
        assert expected in results[0]["content"], (query, [result["content"][:80] for result in results])


def test_bad_requests_are_refused_with_a_message_naming_the_field(project):
    project.up(env={"UPLOAD_FILE_SIZE_LIMIT": "1"})
    dataset_id = create_dataset(project)
    path = f"/v1/datasets/{dataset_id}/documents"
    cases = [
        (upload(project, dataset_id, "tool.exe", b"MZ binary"), 415, "not supported; allowed: .txt"),
        (upload(project, dataset_id, "../x.txt", b"escape"), 400, "not a plain file name"),
        (upload(project, dataset_id, "..\\x.txt", b"escape"), 400, "not a plain file name"),
        (upload(project, dataset_id, ".hidden.txt", b"dot"), 400, "not a plain file name"),
        (upload(project, dataset_id, "big.txt", b"a" * (1024 * 1024 + 1)), 413, "UPLOAD_FILE_SIZE_LIMIT (1 MB)"),
        (upload(project, dataset_id, "huge.txt", b"a" * (8 * 1024 * 1024)), 413, "UPLOAD_FILE_SIZE_LIMIT (1 MB)"),
        (upload(project, dataset_id, "empty.txt", b""), 400, "the file is empty"),
        (upload(project, dataset_id, None, b""), 400, "'file' is missing"),
        (upload(project, dataset_id, "a.txt", b"x", chunk_size="ten"), 400, "'chunk_size' must be an integer"),
        (upload(project, dataset_id, "a.txt", b"x", chunk_size="100", chunk_overlap="100"), 400,
         "'chunk_overlap' (100) must be less than 'chunk_size' (100)"),
        (upload(project, dataset_id, "a.txt", b"x", colour="red"), 400, "unknown field 'colour'"),
        (upload(project, "no-such-dataset", "a.txt", b"x"), 404, "no dataset 'no-such-dataset'"),
        (project.api.request("POST", path, raw=b"plain", headers={"Content-Type": "text/plain"}), 415,
         "multipart/form-data"),
        (project.api.post(path, {"name": "a.txt"}), 400, "'text' is required"),
        (project.api.post(path, {"name": "../a.txt", "text": "x"}), 400, "not a plain file name"),
        (project.api.post("/v1/datasets", {}), 400, "'name' is required"),
        (project.api.post("/v1/datasets", {"name": "x", "chunk_size": 10}), 400,
         "'chunk_size' must be an integer from 50 to 4000"),
        (project.api.post("/v1/datasets", [1]), 400, "must be a JSON object"),
        (project.api.post(f"/v1/datasets/{dataset_id}/search", {"top_k": 3}), 400, "'query' is required"),
        (project.api.post(f"/v1/datasets/{dataset_id}/search", {"query": "x", "top_k": 0}), 400,
         "'top_k' must be an integer from 1 to 50"),
        (project.api.post(f"/v1/datasets/{dataset_id}/search", {"query": "x", "k": 1}), 400, "unknown field 'k'"),
        (project.api.post(f"/v1/datasets/{dataset_id}/documents/nope/segments", {"segments": ["x"]}), 404,
         "no document 'nope'"),
        (project.api.get("/v1/datasets/bad%20id"), 400, "a dataset id is"),
    ]
    for (status, body), expected_status, expected_message in cases:
        assert status == expected_status, (expected_message, status, body)
        assert expected_message in body["error"], (expected_message, body)
    status, listed = project.api.get(path)
    assert status == 200 and listed["documents"] == []  # nothing refused was stored
    assert not (project.dir / "x.txt").exists() and not (project.state / "files" / "x.txt").exists()


def test_a_file_that_cannot_be_read_ends_in_error_with_a_message(project):
    project.up()
    dataset_id = create_dataset(project)
    failures = {"broken.pdf": (b"%PDF-1.4 this is not really a pdf", "PDF"),
                "broken.docx": (b"PK not a zip", "DOCX"),
                "broken.json": (b'{"unterminated": ', "JSON is not valid"),
                "blank.txt": (b"   \n\n  ", "no text to index")}
    for name, (content, message) in failures.items():
        status, body = upload(project, dataset_id, name, content)
        assert status == 202, body
        document = settled(project, dataset_id, body["document"]["id"])
        assert document["status"] == "error" and message in document["error"], (name, document)
        assert [event["status"] for event in document["history"]][-1] == "error"
        assert document["history"][-1]["message"] == document["error"]
    assert search(project, dataset_id, "unterminated pdf") == []


def test_batch_segments_reindex_ranking_and_clean_up(project):
    project.up()
    dataset_id = create_dataset(project)
    text = "Sourdough bread needs a starter, flour, water and salt. " + FILLER * 4
    status, body = project.api.post(f"/v1/datasets/{dataset_id}/documents", {"name": "kitchen.txt", "text": text})
    assert status == 202, body
    document_id = body["document"]["id"]
    assert settled(project, dataset_id, document_id)["status"] == "completed"

    batch = ["The aurora borealis glows green over Tromsø in winter.",
             {"content": "A glacier moves slowly down the mountain valley."},
             "Volcanic eruptions throw ash high into the atmosphere."]
    status, added = project.api.post(f"/v1/datasets/{dataset_id}/documents/{document_id}/segments",
                                     {"segments": batch})
    assert status == 202 and added["task"]["queue"] == "dataset", added
    assert task_result(project, added["task"])["result"]["added"] == 3

    # ranking: the segment sharing the query's words comes first, the others after it
    ranked = search(project, dataset_id, "green aurora borealis in winter", top_k=10)
    assert "aurora borealis" in ranked[0]["content"]
    assert ranked[0]["score"] > ranked[1]["score"]
    assert "glacier" in search(project, dataset_id, "glacier mountain valley")[0]["content"]
    assert "Sourdough" in search(project, dataset_id, "sourdough starter flour")[0]["content"]

    # background re-indexing: the normal queues, back through the statuses, with a new segment size
    status, body = project.api.post(f"/v1/datasets/{dataset_id}/documents/{document_id}/reindex",
                                    {"chunk_size": 100, "chunk_overlap": 10})
    assert status == 202 and body["task"]["queue"] == "dataset", body
    task_result(project, body["task"])
    document = settled(project, dataset_id, document_id)
    assert document["status"] == "completed" and document["chunk_size"] == 100
    assert [event["status"] for event in document["history"]] == STATUSES * 2
    def background_queues():  # task runs are recorded in batches, a moment after they finish
        with sqlite3.connect(project.database) as db:
            return {row[0] for row in db.execute("SELECT queue FROM task_runs WHERE name IN "
                                                 "('document_pipeline_task', 'document_segments_indexing_task')")}
    wait_until(lambda: background_queues() == {"pipeline", "dataset"}, 10, "the background tasks' runs")
    with sqlite3.connect(project.database) as db:
        assert db.execute("SELECT COUNT(*) FROM segments WHERE document_id = ?", [document_id]).fetchone()[0] \
            == document["segment_count"] > 3

    # clean_unused_datasets_task: a dataset untouched for `days` days goes, with its rows and files
    status, sent = project.api.post("/v1/tasks/clean_unused_datasets_task", {"kwargs": {"days": 0}})
    assert status == 202, sent
    assert task_result(project, {**sent, "name": sent["task"]})["result"]["removed"] == 1
    assert project.api.get(f"/v1/datasets/{dataset_id}")[0] == 404
    assert not (project.state / "files" / "datasets" / dataset_id).exists()
    with sqlite3.connect(project.database) as db:
        assert db.execute("SELECT COUNT(*) FROM segments").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM documents").fetchone()[0] == 0


# -- the parts on their own --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x.txt", "a/b.txt", "a\\b.txt", "..", ".env", "x\x00.txt", "", "a" * 300 + ".txt"])
def test_unsafe_file_names_are_refused(name):
    with pytest.raises(files.UploadRefused):
        files.check_file_name(name)


def test_stored_paths_stay_in_the_file_store(tmp_path):
    assert files.document_path(tmp_path, "kb-1", "doc", "pdf") == (tmp_path / "datasets/kb-1/doc.pdf").resolve()
    for dataset_id in ("..", "../x", "a/b"):
        with pytest.raises(files.UploadRefused):
            files.document_path(tmp_path, dataset_id, "doc", "txt")
    with pytest.raises(ValueError):
        files.stored_path(tmp_path, "../outside.txt")


def test_extractors_read_real_files(tmp_path):
    pdf = tmp_path / "a.pdf"
    pdf.write_bytes(pdf_bytes("Hello from a PDF", "T"))
    assert "Hello from a PDF" in extract.extract(pdf, "pdf").text
    document = tmp_path / "a.docx"
    document.write_bytes(docx_bytes(["Hello from a DOCX"]))
    got = extract.extract(document, "docx")
    assert "Hello from a DOCX" in got.text and "tabulated" in got.text
    chinese = tmp_path / "zh.txt"
    chinese.write_bytes("知识库的文档".encode("gb18030"))
    assert extract.extract(chinese, "txt").text == "知识库的文档"


def test_random_requests_never_get_a_5xx(project):
    """Every endpoint with fields of every JSON kind, odd ids and odd multipart parts: 4xx, never 5xx."""
    import random

    project.up()
    dataset_id = create_dataset(project)
    status, body = project.api.post(f"/v1/datasets/{dataset_id}/documents", {"name": "a.txt", "text": "alpha beta"})
    document_id = body["document"]["id"]
    settled(project, dataset_id, document_id)
    chooser = random.Random(6)
    values = [None, True, 0, -1, 1, 49, 50, 4001, 1e309, -0.5, 2.0, "", " ", "x", "10", "ten", "../x", "\x00",
              "a" * 3000, [], ["x"], [1], [{"content": 1}], [{"content": "ok", "extra": 1}], {}, {"a": 1}]
    fields = ["name", "description", "chunk_size", "chunk_overlap", "text", "query", "top_k", "segments", "zzz"]
    ids = [dataset_id, "nope", "..", "%2e%2e", "a" * 80, "x%00y", "-x"]
    paths = ["/v1/datasets", "/v1/datasets/{d}/documents", "/v1/datasets/{d}/search",
             "/v1/datasets/{d}/documents/{doc}/segments", "/v1/datasets/{d}/documents/{doc}/reindex"]
    seen = set()
    for _ in range(300):
        path = chooser.choice(paths).format(d=chooser.choice(ids), doc=chooser.choice([document_id, "nope", ".."]))
        body = {field: chooser.choice(values) for field in chooser.sample(fields, chooser.randint(0, 3))}
        status, answer = project.api.post(path, body)
        assert status < 500 and isinstance(answer, dict) and ("error" in answer) == (status >= 400), \
            (path, body, status, answer)
        seen.add(status)
        status, answer = project.api.get(path.replace("/search", "").replace("/reindex", "")
                                         + chooser.choice(["", "?limit=0", "?limit=x", "?offset=-1", "?limit=5"]))
        assert status < 500, (path, status, answer)
    for name in ["a.txt", "", "a.TXT", "noext", "a.pdf", "x" * 400 + ".txt", "a\".txt"]:
        for fields_sent in [{}, {"chunk_size": "1e3"}, {"chunk_overlap": "-1"}]:
            status, answer = upload(project, dataset_id, name, b"%PDF" if name.endswith("pdf") else b"hello",
                                    **fields_sent)
            assert status < 500, (name, fields_sent, status, answer)
    assert seen >= {400, 404}


PLUGGED_EMBEDDER = '''
class Letters:
    """A toy embedder: how often each letter a-z occurs."""
    name = "letters-26"

    def embed(self, texts):
        return [[text.lower().count(chr(ord("a") + i)) + 0.0 for i in range(26)] for text in texts]
'''


def test_another_embedder_plugs_in_and_a_broken_one_is_reported(project):
    import os

    (project.dir / "my_embedders.py").write_text(PLUGGED_EMBEDDER)
    path = os.pathsep.join(filter(None, [str(project.dir), os.environ.get("PYTHONPATH")]))
    project.up(env={"DIFY_LOCAL_EMBEDDER": "my_embedders:Letters", "PYTHONPATH": path})
    dataset_id = create_dataset(project)
    status, body = upload(project, dataset_id, "z.txt", b"zzz zigzag zebra")
    document = settled(project, dataset_id, body["document"]["id"])
    assert document["status"] == "completed", document
    status, found = project.api.post(f"/v1/datasets/{dataset_id}/search", {"query": "zzz"})
    assert status == 200 and found["embedder"] == "letters-26" and found["results"][0]["document_name"] == "z.txt"
    with sqlite3.connect(project.database) as db:
        assert {row[0] for row in db.execute("SELECT embedding_model FROM segments")} == {"letters-26"}
        # a segment an earlier embedder made is not compared with this one's vectors, but counted
        db.execute("INSERT INTO segments (id, document_id, dataset_id, position, content, embedding, created_at, "
                   "embedding_model) VALUES ('old', ?, ?, 9, 'zzz', x'0000803f', 0, 'hashing-1024')",
                   [document["id"], dataset_id])
    status, found = project.api.post(f"/v1/datasets/{dataset_id}/search", {"query": "zzz", "top_k": 10})
    assert status == 200 and found["skipped_segments"] == 1 and "re-index" in found["note"]
    assert [result["segment_id"] for result in found["results"]] != ["old"] and len(found["results"]) == 1


def test_an_embedder_that_cannot_be_loaded_fails_the_document_with_a_message(project):
    project.up(env={"DIFY_LOCAL_EMBEDDER": "no_such_module_here:Embedder"})
    dataset_id = create_dataset(project)
    status, body = upload(project, dataset_id, "a.txt", b"some text")
    document = settled(project, dataset_id, body["document"]["id"])
    assert document["status"] == "error" and "no_such_module_here" in document["error"], document
    assert [event["status"] for event in document["history"]] == ["waiting", "parsing", "splitting", "indexing",
                                                                  "error"]
    status, found = project.api.post(f"/v1/datasets/{dataset_id}/search", {"query": "text"})
    assert status == 503 and "cannot be loaded" in found["error"]
