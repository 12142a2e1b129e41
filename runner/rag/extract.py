"""Extraction: the text of an uploaded file, and what its format tells about it (title, pages …).

One function per format; each raises ExtractionError with a message a user can act on. Every
extraction runs in a child process with limits on its memory and CPU time
(runner.limited_process), because a parser's cost is the input's choice: a 306 KB DOCX held
300 MB of XML, a PDF stream inflates a thousandfold, a Markdown line of `*a ` repeated took
seconds per 10,000 characters in a regular expression. Inside, each format has its own bounds
too (ExtractionLimits): the file read at most UPLOAD_FILE_SIZE_LIMIT, a DOCX's zip checked before
python-docx opens it (entries, unpacked size, expansion ratio), pypdf's own limits set to ours
and the page count checked, and the text at most the unpacked size. python-docx parses XML
without resolving entities (no XXE, no billion laughs); a test holds it to that.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from runner import limited_process, zip_checks
from runner.capped_files import FileTooLarge, read_capped

MEGABYTE = 1024 * 1024
MAX_DOCX_PARTS = 1000  # zip entries of a DOCX (Word writes a few dozen)


class ExtractionError(Exception):
    """The file's text cannot be read; the message says why."""


@dataclass
class Extracted:
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExtractionLimits:
    """What the extraction of one document may take (the settings named in each field's use)."""

    max_file_mb: int = 15  # UPLOAD_FILE_SIZE_LIMIT
    max_unpacked_mb: int = 50  # DIFY_LOCAL_EXTRACT_MAX_UNPACKED_SIZE
    max_expansion: int = 100  # DIFY_LOCAL_EXTRACT_MAX_EXPANSION
    max_pages: int = 5000  # DIFY_LOCAL_EXTRACT_MAX_PAGES
    memory_mb: int = 1024  # DIFY_LOCAL_EXTRACT_MEMORY
    cpu_seconds: float = 120.0  # DIFY_LOCAL_EXTRACT_TIME_LIMIT

    @classmethod
    def from_settings(cls, settings: Any) -> "ExtractionLimits":
        return cls(settings.UPLOAD_FILE_SIZE_LIMIT, settings.DIFY_LOCAL_EXTRACT_MAX_UNPACKED_SIZE,
                   settings.DIFY_LOCAL_EXTRACT_MAX_EXPANSION, settings.DIFY_LOCAL_EXTRACT_MAX_PAGES,
                   settings.DIFY_LOCAL_EXTRACT_MEMORY, settings.DIFY_LOCAL_EXTRACT_TIME_LIMIT)

    @property
    def max_unpacked(self) -> int:
        return self.max_unpacked_mb * MEGABYTE

    def process(self) -> limited_process.Limits:
        # the reply: the text (at most max_unpacked characters, 6 bytes each as JSON at worst) and metadata
        return limited_process.Limits(self.memory_mb * MEGABYTE, self.cpu_seconds, self.max_unpacked * 6 + MEGABYTE,
                                      "DIFY_LOCAL_EXTRACT_MEMORY", "DIFY_LOCAL_EXTRACT_TIME_LIMIT")


def decode(data: bytes) -> str:
    """Text in UTF-8 (with or without BOM), UTF-16 with BOM, or GB18030 (Chinese documents)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise ExtractionError("the file is not text in UTF-8, UTF-16 (with BOM) or GB18030")


def _txt(data: bytes, limits: ExtractionLimits) -> Extracted:
    return Extracted(decode(data))


# Each inner part excludes its own delimiters (and newlines), so a scan from an opening that never
# closes stops at the next one: linear. `(.+?)\1` scanned to the end of the line from every `*`.
MD_FENCE = re.compile(r"^[ \t]*(```|~~~).*$", re.MULTILINE)
MD_HEADING = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+(.*?)[ \t]*#*[ \t]*$", re.MULTILINE)
MD_IMAGE = re.compile(r"!\[([^\[\]\n]*)\]\([^()\n]*\)")
MD_LINK = re.compile(r"\[([^\[\]\n]+)\]\([^()\n]*\)")
# `_` emphasises only at word edges (CommonMark): CELERY_BROKER_URL keeps its underscores
MD_EMPHASIS = re.compile(r"(\*\*?)(?=[^\s*])([^*\n]+?)(?<=[^\s*])\1|(~~)(?=[^\s~])([^~\n]+?)(?<=[^\s~])~~"
                         r"|`([^`\n]+)`|(?<!\w)(__?)(?=[^\s_])([^_\n]+?)(?<=[^\s_])\6(?!\w)")


def _emphasised(match: re.Match) -> str:
    return match.group(2) or match.group(4) or match.group(5) or match.group(7)
MD_BULLET = re.compile(r"^[ \t]*(?:[-*+]|\d+[.)])[ \t]+", re.MULTILINE)
MD_QUOTE = re.compile(r"^[ \t]*>[ \t]?", re.MULTILINE)


def _md(data: bytes, limits: ExtractionLimits) -> Extracted:
    text = decode(data)
    headings = MD_HEADING.findall(text)
    text = MD_FENCE.sub("", text)
    text = MD_HEADING.sub(r"\1", text)
    text = MD_IMAGE.sub(r"\1", text)
    text = MD_LINK.sub(r"\1", text)
    for _ in range(2):  # twice: emphasis inside emphasis (**a *b* c**) has its inner one taken first
        text = MD_EMPHASIS.sub(_emphasised, text)
    text = MD_BULLET.sub("", text)
    text = MD_QUOTE.sub("", text)
    return Extracted(text, {"title": headings[0]} if headings else {})


HTML_SKIP = {"script", "style", "noscript", "template", "head", "title"}
HTML_BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "table",
              "ul", "ol", "pre", "blockquote"}


def _html(data: bytes, limits: ExtractionLimits) -> Extracted:
    """The text outside scripts, styles and the head, a paragraph break at each block. Parsed by
    libxml2's HTML parser (lxml): Python's html.parser is quadratic on tags that never close
    ('<a' repeated: 80 KB took 44 s) and raises on some declarations ('<![')."""
    from lxml import etree

    parser = etree.HTMLParser(encoding="utf-8", no_network=True, remove_comments=True, remove_pis=True)
    root = etree.fromstring(decode(data).encode("utf-8", "surrogatepass"), parser)
    parts: list[str] = []
    title = ""
    skipping = 0  # depth inside elements whose text is not the document's
    for event, element in etree.iterwalk(root, events=("start", "end")) if root is not None else ():
        tag = element.tag.lower() if isinstance(element.tag, str) else ""
        if event == "start":
            if tag == "title" and not title:
                title = "".join(element.itertext())
            if tag in HTML_SKIP:
                skipping += 1
            elif not skipping:
                if tag in HTML_BLOCK:
                    parts.append("\n\n")
                parts.append(element.text or "")
            continue
        if tag in HTML_SKIP:
            skipping -= 1
        elif not skipping and tag in HTML_BLOCK:
            parts.append("\n\n")
        if not skipping:
            parts.append(element.tail or "")
    title = " ".join(title.split())
    return Extracted("".join(parts), {"title": title} if title else {})


def _csv(data: bytes, limits: ExtractionLimits) -> Extracted:
    """Each row a paragraph of `column: value` pairs, so a segment keeps its row's meaning."""
    text = decode(data)
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    try:
        rows = [row for row in csv.reader(io.StringIO(text), dialect) if any(cell.strip() for cell in row)]
    except csv.Error as error:
        raise ExtractionError(f"the CSV cannot be read: {error}") from None
    if not rows:
        return Extracted("", {"rows": 0})
    header, body = rows[0], rows[1:]
    lines = []
    for row in body or [header]:
        names = header if body else [""] * len(row)
        names = names + [""] * (len(row) - len(names))  # a row longer than the header
        lines.append("; ".join(f"{name}: {value}" if name else value
                               for name, value in zip(names[:len(row)], row, strict=True) if value.strip()))
    return Extracted("\n\n".join(lines), {"rows": len(body), "columns": header})


def _json_lines(value: Any, path: str, out: list[str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _json_lines(item, f"{path}.{key}" if path else str(key), out)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _json_lines(item, f"{path}[{index}]", out)
    elif value is not None:
        out.append(f"{path}: {value}" if path else str(value))


def _json(data: bytes, limits: ExtractionLimits) -> Extracted:
    """Every scalar as a `path: value` line, one paragraph per top-level entry."""
    try:
        document = json.loads(decode(data))
    except json.JSONDecodeError as error:
        raise ExtractionError(f"the JSON is not valid: {error}") from None
    except RecursionError:
        raise ExtractionError("the JSON nests arrays and objects too deeply to read") from None
    try:
        return _json_text(document)
    except RecursionError:
        raise ExtractionError("the JSON nests arrays and objects too deeply to read") from None


def _json_text(document: Any) -> Extracted:
    items = list(document.items()) if isinstance(document, dict) else \
        list(enumerate(document)) if isinstance(document, list) else [("", document)]
    paragraphs = []
    for key, item in items:
        out: list[str] = []
        prefix = f"[{key}]" if isinstance(key, int) else str(key)
        _json_lines(item, prefix, out)
        if out:
            paragraphs.append("\n".join(out))
    return Extracted("\n\n".join(paragraphs), {"json_type": type(document).__name__})


def _pdf(data: bytes, limits: ExtractionLimits) -> Extracted:
    import pypdf
    from pypdf.errors import LimitReachedError, PdfReadError

    most = limits.max_unpacked
    # pypdf's own limits (75 MB a stream by default) set to ours: each stream decoded, each page's
    # content parsed, the page tree walked (a tree of shared /Kids lists multiplies its pages)
    bounded = pypdf.apply_configuration(
        maximum_declared_stream_length=most, array_based_stream_maximum_output_length=most,
        jbig2_maximum_output_length=most, lzw_maximum_output_length=most, run_length_maximum_output_length=most,
        zlib_maximum_output_length=most, brotli_maximum_output_length=most, image_maximum_buffer_size=most,
        stream_decoding_work_maximum_length=4 * most,
        xfa_decoding_work_maximum_length=4 * most, page_tree_maximum_entries=4 * limits.max_pages + 16,
        jbig2dec_binary=None)
    try:
        with bounded:
            reader = pypdf.PdfReader(io.BytesIO(data))
            if reader.is_encrypted:
                raise ExtractionError("the PDF is encrypted; upload a copy without a password")
            count = len(reader.pages)
            if count > limits.max_pages:
                raise ExtractionError(f"the PDF has {count} pages; at most {limits.max_pages} are allowed "
                                      "(DIFY_LOCAL_EXTRACT_MAX_PAGES)")
            pages, size = [], 0
            for page in reader.pages:
                contents = page.get_contents()  # decoded here first: extract_text swallows a limit reached
                if contents is not None:
                    contents.get_data()
                text = page.extract_text() or ""
                size += len(text)
                if size > most:
                    raise ExtractionError(f"the PDF's text is over {limits.max_unpacked_mb} MB "
                                          "(DIFY_LOCAL_EXTRACT_MAX_UNPACKED_SIZE)")
                pages.append(text)
            info = reader.metadata
    except ExtractionError:
        raise
    except LimitReachedError as error:
        raise ExtractionError(f"the PDF is over a limit: {error} (DIFY_LOCAL_EXTRACT_MAX_UNPACKED_SIZE, "
                              "DIFY_LOCAL_EXTRACT_MAX_PAGES)") from None
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as error:
        raise ExtractionError(f"the PDF cannot be read: {type(error).__name__}: {error}") from None
    metadata: dict[str, Any] = {"pages": len(pages)}
    if info is not None and info.title:
        metadata["title"] = str(info.title)
    if info is not None and info.author:
        metadata["author"] = str(info.author)
    return Extracted("\n\n".join(pages), metadata)


def _docx(data: bytes, limits: ExtractionLimits) -> Extracted:
    import zipfile

    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:  # python-docx reads every part into memory first: their sizes are checked before
        zip_checks.open_checked(data, MAX_DOCX_PARTS, limits.max_unpacked, limits.max_expansion,
                                "DIFY_LOCAL_EXTRACT_MAX_UNPACKED_SIZE").close()
    except zip_checks.ZipRefused as error:
        expansion = " (DIFY_LOCAL_EXTRACT_MAX_EXPANSION)" if "times its size" in str(error) else ""
        raise ExtractionError(f"the DOCX is refused: {error}{expansion}") from None
    try:
        document = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, zipfile.BadZipFile, KeyError, ValueError) as error:
        raise ExtractionError(f"the DOCX cannot be read: {type(error).__name__}: {error}") from None
    paragraphs = [paragraph.text for paragraph in document.paragraphs]
    for table in document.tables:
        for row in table.rows:
            paragraphs.append(" | ".join(cell.text for cell in row.cells))
    properties = document.core_properties
    metadata: dict[str, Any] = {"paragraphs_in_file": len(document.paragraphs), "tables": len(document.tables)}
    if properties.title:
        metadata["title"] = properties.title
    if properties.author:
        metadata["author"] = properties.author
    return Extracted("\n\n".join(paragraphs), metadata)


EXTRACTORS: dict[str, Callable[[bytes, ExtractionLimits], Extracted]] = {
    "txt": _txt, "md": _md, "html": _html, "csv": _csv, "json": _json, "pdf": _pdf, "docx": _docx,
}
# imported before the child is forked (runner.limited_process says why), and only by the worker
LIBRARIES = {"pdf": ("pypdf",), "docx": ("docx", "docx.opc.exceptions"), "html": ("lxml.etree",)}


def _extract_in_child(data: bytes, file_type: str, limits: ExtractionLimits) -> dict[str, Any]:
    extracted = EXTRACTORS[file_type](data, limits)
    if len(extracted.text) > limits.max_unpacked:
        raise ExtractionError(f"the document's text is over {limits.max_unpacked_mb} MB "
                              "(DIFY_LOCAL_EXTRACT_MAX_UNPACKED_SIZE)")
    return {"text": extracted.text, "metadata": extracted.metadata}


def read_document(path: Path, limits: ExtractionLimits = ExtractionLimits()) -> bytes:
    """A document's bytes from a path of the caller's (the file store reads through runner.safe_files)."""
    try:
        return read_capped(path, limits.max_file_mb * MEGABYTE, "an uploaded document")
    except FileTooLarge:
        raise ExtractionError(f"the file is over {limits.max_file_mb} MB (UPLOAD_FILE_SIZE_LIMIT)") from None
    except OSError as error:
        raise ExtractionError(f"the uploaded file cannot be read: {error.strerror}") from None


def extract(path: Path, file_type: str, limits: ExtractionLimits = ExtractionLimits()) -> Extracted:
    """The text and metadata of the document at `path`; ExtractionError says why not."""
    return extract_data(read_document(path, limits), file_type, limits)


def extract_data(data: bytes, file_type: str, limits: ExtractionLimits = ExtractionLimits()) -> Extracted:
    """The document's text and metadata, extracted in a limited child; ExtractionError says why not."""
    if file_type not in EXTRACTORS:
        raise ExtractionError(f"no extractor for file type {file_type!r}; supported: {', '.join(EXTRACTORS)}")
    if len(data) > limits.max_file_mb * MEGABYTE:
        raise ExtractionError(f"the file is over {limits.max_file_mb} MB (UPLOAD_FILE_SIZE_LIMIT)")
    for module in LIBRARIES.get(file_type, ()):
        __import__(module)
    try:
        reply = limited_process.run(_extract_in_child, (data, file_type, limits), limits.process(),
                                    f"extracting the {file_type.upper()}'s text")
    except limited_process.LimitReached as error:
        raise ExtractionError(str(error)) from None
    except limited_process.ChildError as error:
        if error.kind == "ExtractionError":
            raise ExtractionError(str(error)) from None
        raise ExtractionError(f"the {file_type.upper()} cannot be read: {error.kind}: {error}") from None
    return Extracted(reply["text"], reply["metadata"])
