"""Reading the local outbox: the .eml files the mail tasks write, newest first."""

from __future__ import annotations

import os
import re
from email import policy
from email.parser import BytesHeaderParser, BytesParser
from typing import Any

from runner import safe_files
from runner.state import StatePaths

MAIL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.eml$")
HEADERS = ("from", "to", "subject", "date", "message_id")
MAX_HEADERS = 64 * 1024  # bytes read for a mail's summary (the header parser read each file to its end)
MAX_MAIL = 16 * 1024 * 1024  # bytes of one mail read whole (the tasks write at most a few megabytes)


def _summary(paths: StatePaths, name: str, raw: bytes | None = None) -> dict[str, Any] | None:
    try:
        if raw is None:
            with safe_files.open_file(paths.root, paths.outbox / name, "rb") as handle:
                headers = BytesHeaderParser(policy=policy.default).parsebytes(handle.read(MAX_HEADERS))
                size = os.fstat(handle.fileno()).st_size
        else:
            headers, size = BytesHeaderParser(policy=policy.default).parsebytes(raw[:MAX_HEADERS]), len(raw)
    except FileNotFoundError:  # removed meanwhile
        return None
    return {"name": name, "from": str(headers["From"] or ""), "to": str(headers["To"] or ""),
            "subject": str(headers["Subject"] or ""), "date": str(headers["Date"] or ""),
            "message_id": str(headers["Message-ID"] or ""), "size": size}


def list_mail(paths: StatePaths, to: str | None = None, limit: int = 100) -> tuple[int, list[dict[str, Any]]]:
    """(how many mails match, the newest `limit` of them); names start with their UTC time."""
    names = sorted((name for name in safe_files.list_folder(paths.root, paths.outbox) if MAIL_NAME.match(name)),
                   reverse=True)
    summaries = (summary for summary in (_summary(paths, name) for name in names) if summary is not None)
    if to is not None:
        summaries = (summary for summary in summaries if summary["to"].lower() == to.lower())
    matching = list(summaries)
    return len(matching), matching[:limit]


def read_mail(paths: StatePaths, name: str) -> dict[str, Any] | None:
    """One mail with its text and HTML bodies; None when there is no such mail."""
    if not MAIL_NAME.match(name):
        raise ValueError("a mail name is letters, digits, '.', '_' and '-' ending in .eml (GET /v1/mail lists them)")
    try:
        raw = safe_files.read_bytes(paths.root, paths.outbox / name, MAX_MAIL, "a mail read through the API")
    except (FileNotFoundError, IsADirectoryError):
        return None
    summary = _summary(paths, name, raw)
    if summary is None:
        return None
    message = BytesParser(policy=policy.default).parsebytes(raw)
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    return {**summary, "text": text.get_content() if text else None,
            "html": html.get_content() if html else None}
