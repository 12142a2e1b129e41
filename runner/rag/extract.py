"""Extraction: the text of an uploaded file, and what its format tells about it (title, pages …).

One function per format; each raises ExtractionError with a message a user can act on.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable


class ExtractionError(Exception):
    """The file's text cannot be read; the message says why."""


@dataclass
class Extracted:
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


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


def _txt(data: bytes) -> Extracted:
    return Extracted(decode(data))


MD_FENCE = re.compile(r"^[ \t]*(```|~~~).*$", re.MULTILINE)
MD_HEADING = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+(.*?)[ \t]*#*[ \t]*$", re.MULTILINE)
MD_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
MD_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
# `_` emphasises only at word edges (CommonMark): CELERY_BROKER_URL keeps its underscores
MD_EMPHASIS = re.compile(r"(\*\*|\*|~~|`)(?=\S)(.+?)(?<=\S)\1|(?<!\w)(__|_)(?=\S)(.+?)(?<=\S)\3(?!\w)")
MD_BULLET = re.compile(r"^[ \t]*(?:[-*+]|\d+[.)])[ \t]+", re.MULTILINE)
MD_QUOTE = re.compile(r"^[ \t]*>[ \t]?", re.MULTILINE)


def _md(data: bytes) -> Extracted:
    text = decode(data)
    headings = MD_HEADING.findall(text)
    text = MD_FENCE.sub("", text)
    text = MD_HEADING.sub(r"\1", text)
    text = MD_IMAGE.sub(r"\1", text)
    text = MD_LINK.sub(r"\1", text)
    text = MD_EMPHASIS.sub(lambda match: match.group(2) or match.group(4), text)
    text = MD_BULLET.sub("", text)
    text = MD_QUOTE.sub("", text)
    return Extracted(text, {"title": headings[0]} if headings else {})


class _HtmlText(HTMLParser):
    SKIP = {"script", "style", "noscript", "template", "head"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "table",
             "ul", "ol", "pre", "blockquote"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0
        self.in_title = False
        self.title = ""

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        elif tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        elif tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self.in_title:
            self.title += data
        elif not self.skipping:
            self.parts.append(data)


def _html(data: bytes) -> Extracted:
    parser = _HtmlText()
    parser.feed(decode(data))
    parser.close()
    title = " ".join(parser.title.split())
    return Extracted("".join(parser.parts), {"title": title} if title else {})


def _csv(data: bytes) -> Extracted:
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


def _json(data: bytes) -> Extracted:
    """Every scalar as a `path: value` line, one paragraph per top-level entry."""
    try:
        document = json.loads(decode(data))
    except json.JSONDecodeError as error:
        raise ExtractionError(f"the JSON is not valid: {error}") from None
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


def _pdf(data: bytes) -> Extracted:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise ExtractionError("the PDF is encrypted; upload a copy without a password")
        pages = [page.extract_text() or "" for page in reader.pages]
        info = reader.metadata
    except ExtractionError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as error:
        raise ExtractionError(f"the PDF cannot be read: {type(error).__name__}: {error}") from None
    metadata: dict[str, Any] = {"pages": len(pages)}
    if info is not None and info.title:
        metadata["title"] = str(info.title)
    if info is not None and info.author:
        metadata["author"] = str(info.author)
    return Extracted("\n\n".join(pages), metadata)


def _docx(data: bytes) -> Extracted:
    import zipfile

    import docx
    from docx.opc.exceptions import PackageNotFoundError

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


EXTRACTORS: dict[str, Callable[[bytes], Extracted]] = {
    "txt": _txt, "md": _md, "html": _html, "csv": _csv, "json": _json, "pdf": _pdf, "docx": _docx,
}


def extract(path: Path, file_type: str) -> Extracted:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ExtractionError(f"the uploaded file cannot be read: {error.strerror}") from None
    return extract_data(data, file_type)


def extract_data(data: bytes, file_type: str) -> Extracted:
    extractor = EXTRACTORS.get(file_type)
    if extractor is None:
        raise ExtractionError(f"no extractor for file type {file_type!r}; supported: {', '.join(EXTRACTORS)}")
    return extractor(data)
