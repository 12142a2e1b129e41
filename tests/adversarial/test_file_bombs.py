"""A bomb for every file format the project parses: each is refused with a line naming the limit,
or read harmlessly, and the process that parsed it stays small and keeps serving.

Formats: uploaded documents (TXT, Markdown, HTML, CSV, JSON, PDF, DOCX, run in a limited child by
runner.rag.extract), plugin packages (zip, YAML and JSON manifests), workflow templates (Jinja).
The first tests call the parsers as the worker and the API do; the last sends every bomb through
a running stack, under an address-space limit so that a regression fails the test instead of
taking the machine.
"""

from __future__ import annotations

import functools
import io
import sys
import zipfile
import zlib
from pathlib import Path

import docx
import psutil
import pytest

from runner import plugins, workflows
from runner.rag import extract
from runner.rag.clean import clean_text
from tests.helpers import wait_until

MB = 1024 * 1024
LIMITS = extract.ExtractionLimits(max_file_mb=15, max_unpacked_mb=20, max_expansion=100, max_pages=500,
                                  memory_mb=256, cpu_seconds=20)
W = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"


# -- building the bombs ------------------------------------------------------------------------------

def plain_docx(text: str = "A real paragraph.") -> bytes:
    document = docx.Document()
    document.add_paragraph(text)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def docx_with_body(chunks, doctype: str = "") -> bytes:
    """A real DOCX whose word/document.xml is `doctype`, then the body's paragraphs from `chunks`
    (streamed into the zip: a 60 MB part is never held whole)."""
    template = zipfile.ZipFile(io.BytesIO(plain_docx()))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as out:
        for info in template.infolist():
            if info.filename != "word/document.xml":
                out.writestr(info, template.read(info))
        info = zipfile.ZipInfo("word/document.xml")
        info.compress_type = zipfile.ZIP_DEFLATED
        with out.open(info, "w", force_zip64=True) as part:
            part.write(f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>{doctype}'
                       f'<w:document xmlns:w="{W}"><w:body>'.encode())
            for chunk in chunks:
                part.write(chunk)
            part.write(b"</w:body></w:document>")
    return buffer.getvalue()


def paragraphs(count: int, text: str = "a") -> list[bytes]:
    one = f"<w:p><w:r><w:t>{text}</w:t></w:r></w:p>".encode()
    block = one * 10_000
    return [block] * (count // 10_000)


def raw_pdf(objects: list[bytes]) -> bytes:
    """A PDF of these objects (object 1 the catalog) with a correct cross-reference table."""
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


PAGE = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << >> /Contents 4 0 R >>"


def flate_bomb_pdf(inflated: int) -> bytes:
    """One page whose content stream is `inflated` bytes of spaces, deflated to a thousandth."""
    data = zlib.compress(b" " * inflated, 9)
    return raw_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>", PAGE,
                    b"<< /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream" % (len(data), data)])


def many_pages_pdf(pages: int) -> bytes:
    """One page object listed `pages` times in the page tree."""
    kids = b" ".join([b"3 0 R"] * pages)
    return raw_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages),
                    PAGE, b"<< /Length 0 >>\nstream\n\nendstream"])


def page_tree_dag_pdf(levels: int = 6, fan: int = 10) -> bytes:
    """A page tree of `levels` nodes each listing the next `fan` times: fan**levels pages from a
    few hundred bytes."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]  # 2: the root, filled below
    first = len(objects) + 3  # objects 3 and 4 are the page and its content
    objects += [PAGE, b"<< /Length 0 >>\nstream\n\nendstream"]
    for level in range(levels):
        child = first + level + 1 if level < levels - 1 else 3
        objects.append(b"<< /Type /Pages /Kids [%s] /Count %d >>"
                       % (b" ".join([b"%d 0 R" % child] * fan), fan ** (levels - level)))
    objects[1] = b"<< /Type /Pages /Kids [%d 0 R] /Count %d >>" % (first, fan ** levels)
    return raw_pdf(objects)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text("TOP-SECRET-CONTENT")
    return path


XXE = '<!DOCTYPE w:document [<!ENTITY xxe SYSTEM "file://{path}">]>'
LAUGHS = ('<!DOCTYPE w:document [<!ENTITY a "lollollollollollollollollollol">'
          + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(8)) + "]>")


def docx_parts(count: int) -> bytes:
    template = zipfile.ZipFile(io.BytesIO(plain_docx()))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as out:
        for info in template.infolist():
            out.writestr(info, template.read(info))
        for number in range(count):
            out.writestr(f"customXml/part{number}.xml", b"<a/>")
    return buffer.getvalue()



# (id, file type, builder, words of the ExtractionError)
REFUSED = [
    ("docx: 60 MB of XML in 300 KB", "docx", lambda: docx_with_body(paragraphs(1_600_000)), "unpacks to more than"),
    ("docx: a thousandfold expansion", "docx", lambda: docx_with_body(paragraphs(200_000)), "times its size"),
    ("docx: 5,000 parts", "docx", lambda: docx_parts(5000), "at most 1000 are allowed"),
    ("docx: XML 5,000 deep", "docx", lambda: docx_with_body([b"<w:p>" * 5000 + b"</w:p>" * 5000]), "cannot be read"),
    ("pdf: flate bomb", "pdf", lambda: flate_bomb_pdf(60 * MB), "over a limit"),
    ("pdf: 600 pages", "pdf", lambda: many_pages_pdf(600), "at most 500 are allowed"),
    ("pdf: a page tree of a million pages", "pdf", page_tree_dag_pdf, "over a limit"),
    ("json: 100,000 deep", "json", lambda: b"[" * 100_000 + b"]" * 100_000, "nests arrays and objects too deeply"),
    ("txt: over UPLOAD_FILE_SIZE_LIMIT on disk", "txt", lambda: b"a" * (16 * MB), "the file is over 15 MB"),
]


# -- documents, as the worker extracts them ----------------------------------------------------------

@pytest.mark.parametrize("file_type, build, words", [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_each_document_bomb_is_refused_naming_the_limit(tmp_path, file_type, build, words):
    path = write(tmp_path, f"bomb.{file_type}", build())
    with pytest.raises(extract.ExtractionError) as refused:
        extract.extract(path, file_type, LIMITS)
    assert words in str(refused.value), str(refused.value)
    assert "\n" not in str(refused.value) and "Traceback" not in str(refused.value)


def test_docx_entities_are_never_resolved(tmp_path):
    """XXE (an external entity naming a local file) and a billion laughs of internal entities:
    python-docx's parser resolves neither; the text holds no file content and no expansion."""
    secret = secret_file(tmp_path)
    xxe = docx_with_body([b"<w:p><w:r><w:t>before &xxe; after</w:t></w:r></w:p>"], XXE.format(path=secret))
    got = extract.extract(write(tmp_path, "xxe.docx", xxe), "docx", LIMITS)
    assert "TOP-SECRET" not in got.text and "before" in got.text
    laughs = docx_with_body([b"<w:p><w:r><w:t>&i;</w:t></w:r></w:p>"], LAUGHS)
    try:  # libxml2 counts the amplification even unresolved, and may refuse the part
        text = extract.extract(write(tmp_path, "laughs.docx", laughs), "docx", LIMITS).text
    except extract.ExtractionError as error:
        assert "amplification" in str(error), str(error)
    else:
        assert len(text) < 1000 and "lollol" not in text


def test_a_nested_zip_is_kept_as_it_is(tmp_path):
    """A DOCX carrying a zip bomb as a part: its text is read, the inner zip never opened."""
    template = zipfile.ZipFile(io.BytesIO(plain_docx("Text beside a nested zip.")))
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w", zipfile.ZIP_STORED) as out:
        for info in template.infolist():
            out.writestr(info, template.read(info))
        out.writestr("word/media/inner.zip", zip_bomb())
    got = extract.extract(write(tmp_path, "nested.docx", outer.getvalue()), "docx", LIMITS)
    assert "Text beside a nested zip." in got.text


# Inputs on which a parser's time grew with the square of their length (or worse): each ends within
# the CPU limit, with its text. A regression ends in "took more than 20 s of CPU".
SLOW_BEFORE = [
    ("md: '*a ' on one line", "md", b"*a " * 300_000),
    ("md: unclosed image and link brackets", "md", b"![" * 300_000 + b"[x" * 300_000),
    ("html: tags that never close", "html", b"<a" * 300_000),
    ("html: declarations html.parser raised on", "html", b"<![" * 300_000),
    ("txt: '<' that never closes (the cleaner's tag pattern)", "txt", b"<" * 3 * MB),
    ("csv: one row of 100,000 cells", "csv", b",".join([b"x"] * 100_000)),
]


@pytest.mark.parametrize("file_type, content", [case[1:] for case in SLOW_BEFORE],
                         ids=[case[0] for case in SLOW_BEFORE])
def test_inputs_that_backtracked_are_read_within_the_limit(tmp_path, file_type, content):
    got = extract.extract(write(tmp_path, f"slow.{file_type}", content), file_type, LIMITS)
    clean_text(got.text)  # the worker's next step, in the worker itself: linear too


def test_the_memory_limit_stops_a_parser_that_stays_under_every_size_limit(tmp_path):
    """15 MB of XML is under the unpacked limit; lxml's tree of it is far over 64 MB."""
    small = extract.ExtractionLimits(max_unpacked_mb=20, max_expansion=10_000, memory_mb=64, cpu_seconds=20)
    path = write(tmp_path, "big.docx", docx_with_body(paragraphs(400_000)))
    with pytest.raises(extract.ExtractionError, match="needed more than 64 MB of memory"):
        extract.extract(path, "docx", small)


# -- plugin packages and workflow templates ----------------------------------------------------------

BILLION_LAUGHS = "name: laughs\nversion: 1.0.0\nauthor: me\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + \
    "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9))
MANIFEST = "name: p\nversion: 1.0.0\nauthor: me\n"


def plugin_zip(*entries: tuple[str, bytes], manifest: str = MANIFEST) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.yaml", manifest)
        for name, content in entries:
            archive.writestr(name, content)
    return buffer.getvalue()


def overlapping_zip() -> bytes:
    """Fifield's non-recursive zip bomb, in small: a second directory record over a.py's data."""
    data = plugin_zip(("a.py", b"x" * 100_000))
    first = data.index(b"PK\x01\x02")
    record = data.index(b"PK\x01\x02", first + 4)  # a.py's record
    end = data.index(b"PK\x05\x06")
    copy = bytearray(data[record:end])
    copy[46:50] = b"b.py"
    directory = data[first:end] + bytes(copy)
    tail = bytearray(data[end:])
    tail[8:10] = tail[10:12] = (3).to_bytes(2, "little")
    tail[12:16] = len(directory).to_bytes(4, "little")
    return data[:first] + directory + bytes(tail)


@functools.cache
def zip_bomb() -> bytes:
    """256 MB of zeros declared honestly, in a quarter of a megabyte (made once)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.yaml", MANIFEST)
        with archive.open("zeros.bin", "w", force_zip64=True) as zeros:
            for _ in range(256):
                zeros.write(bytes(MB))
    return buffer.getvalue()


def json_manifest_zip(deep: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", '{"name": "p", "version": "1.0.0", "author": "me", "x": ' + deep + "}")
    return buffer.getvalue()


PACKAGES = [  # (id, builder, words)
    ("zip bomb: 256 MB of zeros", zip_bomb, "unpacks to more than"),
    ("overlapping entries", overlapping_zip, "'b.py'"),
    ("yaml: billion laughs", lambda: plugin_zip(manifest=BILLION_LAUGHS), "aliases (*name) are not allowed"),
    ("json manifest 10,000 deep", lambda: json_manifest_zip("[" * 10_000 + "]" * 10_000), "deeper than 64"),
    ("a folder named manifest.yaml/", lambda: folder_manifest_zip(), "'manifest.yaml/' is a folder"),
    ("'a' beside 'a/b'", lambda: plugin_zip(("a", b"1"), ("a/b", b"2")), "'a' is a file, but 'a/b' needs a folder"),
]


def folder_manifest_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("manifest.yaml/", b"")
        archive.writestr("manifest.yaml/name", b"p")
    return buffer.getvalue()


@pytest.mark.parametrize("build, words", [case[1:] for case in PACKAGES], ids=[case[0] for case in PACKAGES])
def test_each_package_bomb_is_refused_naming_the_limit(build, words):
    with pytest.raises(plugins.PluginPackageError) as refused:
        plugins.inspect_package(build(), max_package=15 * MB, max_unpacked=50 * MB)
    assert words in str(refused.value), str(refused.value)


def test_a_nested_zip_in_a_plugin_is_unpacked_as_a_file(tmp_path):
    inner = zip_bomb()
    data = plugin_zip(("inner.zip", inner))
    package = plugins.inspect_package(data, max_package=15 * MB, max_unpacked=50 * MB)
    written = plugins.unpack(data, tmp_path, tmp_path / "p", 50 * MB)  # (tmp_path as the state folder)
    assert package.name == "p" and written < 2 * len(inner) and (tmp_path / "p" / "inner.zip").read_bytes() == inner


TEMPLATES = [  # (id, template, words): the default limits
    ("center(50000000)", "{{ 'a'|center(50000000) }}", "output is over 1000000 characters"),
    ("~ doubling", "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                   "{{ ns.s[:1] }}", "more than 256 MB of memory"),
    ("nested loops", "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
     "more than 5 s of CPU"),
    ("format width", "{{ '%0999999999d'|format(1) }}", "more than 256 MB of memory"),
]


@pytest.mark.parametrize("template, words", [case[1:] for case in TEMPLATES], ids=[case[0] for case in TEMPLATES])
def test_each_template_bomb_fails_its_node_naming_the_limit(template, words):
    graph = {"nodes": [{"id": "s", "type": "start"}, {"id": "t", "type": "template", "template": template}],
             "edges": [{"source": "s", "target": "t"}]}
    result = workflows.run(graph, {})
    assert result.status == "failed" and words in result.error, result.error


# -- every bomb through a running stack --------------------------------------------------------------

ADDRESS_SPACE = 3 << 30  # each process of the stack: a regression fails here instead of taking the machine
UNDER_LIMIT = "import os, resource, sys; n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_AS, (n, n)); " \
              "os.execvp(sys.argv[2], sys.argv[2:])"
PEAK_RSS = 400 * MB  # the API and the worker, whatever they were sent (they idle at about 60 MB)
STACK_LIMITS = {"DIFY_LOCAL_EXTRACT_MAX_UNPACKED_SIZE": "20", "DIFY_LOCAL_EXTRACT_MAX_PAGES": "500",
                "DIFY_LOCAL_EXTRACT_MEMORY": "256", "DIFY_LOCAL_EXTRACT_TIME_LIMIT": "20"}


def peak_rss(proc, role: str) -> int:
    """The largest resident size the process `dify-local serve ROLE` under `up` has had (VmHWM)."""
    for pid in proc.tree():
        try:
            process = psutil.Process(pid)
            if process.cmdline()[-2:] == ["serve", role]:
                with open(f"/proc/{pid}/status") as status:
                    return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024
        except (psutil.Error, OSError, StopIteration):
            continue
    raise AssertionError(f"no `serve {role}` process under up")


def test_every_bomb_through_a_running_stack(project):
    from tests.test_knowledge import create_dataset, settled, upload

    proc = project.start(argv=[sys.executable, "-c", UNDER_LIMIT, str(ADDRESS_SPACE), *project.program, "up"],
                         env=STACK_LIMITS)
    proc.wait_for_line(r"ready in [\d.]+ s", timeout=90)
    dataset_id = create_dataset(project)

    sent: dict[str, tuple[str, str | None]] = {}  # document id -> (case, words of its error; None: completed)
    cases = [("docx: 300 MB of XML (the review's)", "docx", lambda: docx_with_body(paragraphs(8_000_000)),
              "unpacks to more than")] + [case for case in REFUSED if not case[0].startswith("txt")]
    for name, file_type, build, words in cases:
        status, body = upload(project, dataset_id, f"bomb.{file_type}", build())
        assert status == 202, (name, body)
        sent[body["document"]["id"]] = (name, words)
    for name, file_type, content in SLOW_BEFORE:
        status, body = upload(project, dataset_id, f"slow.{file_type}", content)
        assert status == 202, (name, body)
        sent[body["document"]["id"]] = (name, None)

    for name, build, words in PACKAGES:
        status, body = project.api.request("POST", "/v1/plugins", raw=build(),
                                           headers={"Content-Type": "application/zip"})
        assert status in (400, 413) and words in body["error"], (name, status, body)
        assert "entry" in body or "field" in body or status == 413, (name, body)

    runs = {}
    for name, template, words in TEMPLATES:
        graph = {"nodes": [{"id": "s", "type": "start"}, {"id": "t", "type": "template", "template": template}],
                 "edges": [{"source": "s", "target": "t"}]}
        status, body = project.api.post("/v1/workflows/run", {"graph": graph})
        assert status == 202, (name, body)
        runs[body["poll"]] = (name, words)

    for document_id, (name, words) in sent.items():
        document = settled(project, dataset_id, document_id, timeout=120)
        if words is None:  # read within the limits; "no text to index" is a fair end for markup alone
            assert document["status"] == "completed" or "no text" in (document["error"] or ""), (name, document)
        else:
            assert document["status"] == "error" and words in document["error"], (name, document)
    for poll, (name, words) in runs.items():
        result = wait_until(lambda poll=poll: (lambda body: body if body["state"] in ("SUCCESS", "FAILURE") else None)(
            project.api.get(poll)[1]), 120, f"the run of {name}")
        assert result["state"] == "SUCCESS" and result["result"]["status"] == "failed", (name, result)
        assert words in result["result"]["error"], (name, result["result"])

    for role in ("api", "worker"):
        assert peak_rss(proc, role) < PEAK_RSS, (role, peak_rss(proc, role))
    assert project.api.status("/health") == 200
    assert "Traceback" not in proc.output, proc.output[-5000:]


# -- files the CLI reads ---------------------------------------------------------------------------

def run_limited(project, *args: str, limit: int = 1 << 30):
    """`dify-local ARGS` under an address-space limit (a read without end fails instead of filling memory)."""
    import subprocess

    return subprocess.run([sys.executable, "-c", UNDER_LIMIT, str(limit), *project.program, *args], cwd=project.dir,
                          env=project.env, capture_output=True, text=True, timeout=120)


def test_an_env_file_without_end_is_refused(project):
    result = run_limited(project, "-e", "/dev/zero", "config")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "at most" in result.stderr, result.stderr


# the CLI's own files: the Procfile and local_config/processes.toml (read capped; tomllib recurses)


def test_a_procfile_without_end_is_refused(project):
    result = run_limited(project, "up", "--procfile", "/dev/zero")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "/dev/zero holds more than 1 MiB; a Procfile may have at most that" in result.stderr, result.stderr


def test_a_processes_toml_nested_deep_is_refused(project):
    (project.dir / "local_config").mkdir()
    (project.dir / "local_config" / "processes.toml").write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    result = run_limited(project, "up")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "processes.toml nests arrays or tables too deep" in result.stderr, result.stderr
