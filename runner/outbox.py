"""Reading the local outbox: the .eml files the mail tasks write, newest first."""

from __future__ import annotations

import re
from email import policy
from email.parser import BytesHeaderParser, BytesParser
from pathlib import Path
from typing import Any

from runner.capped_files import read_capped

MAIL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.eml$")
HEADERS = ("from", "to", "subject", "date", "message_id")
MAX_HEADERS = 64 * 1024  # bytes read for a mail's summary (the header parser read each file to its end)
MAX_MAIL = 16 * 1024 * 1024  # bytes of one mail read whole (the tasks write at most a few megabytes)


def _summary(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as handle:
            headers = BytesHeaderParser(policy=policy.default).parsebytes(handle.read(MAX_HEADERS))
        size = path.stat().st_size
    except FileNotFoundError:  # removed meanwhile
        return None
    return {"name": path.name, "from": str(headers["From"] or ""), "to": str(headers["To"] or ""),
            "subject": str(headers["Subject"] or ""), "date": str(headers["Date"] or ""),
            "message_id": str(headers["Message-ID"] or ""), "size": size}


def list_mail(outbox: Path, to: str | None = None, limit: int = 100) -> tuple[int, list[dict[str, Any]]]:
    """(how many mails match, the newest `limit` of them); names start with their UTC time."""
    if not outbox.is_dir():
        return 0, []
    paths = sorted((path for path in outbox.iterdir() if MAIL_NAME.match(path.name)),
                   key=lambda path: path.name, reverse=True)
    summaries = (summary for summary in map(_summary, paths) if summary is not None)
    if to is not None:
        summaries = (summary for summary in summaries if summary["to"].lower() == to.lower())
    matching = list(summaries)
    return len(matching), matching[:limit]


def read_mail(outbox: Path, name: str) -> dict[str, Any] | None:
    """One mail with its text and HTML bodies; None when there is no such mail."""
    if not MAIL_NAME.match(name):
        raise ValueError("a mail name is letters, digits, '.', '_' and '-' ending in .eml (GET /v1/mail lists them)")
    path = outbox / name
    try:
        raw = read_capped(path, MAX_MAIL, "a mail read through the API")
    except (FileNotFoundError, IsADirectoryError):
        return None
    summary = _summary(path)
    if summary is None:
        return None
    message = BytesParser(policy=policy.default).parsebytes(raw)
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    return {**summary, "text": text.get_content() if text else None,
            "html": html.get_content() if html else None}
