"""Delivering a mail: to the local outbox (one .eml file per mail, the default) or to the SMTP
server the settings name (MAIL_TYPE=smtp), with Dify's setting names."""

from __future__ import annotations

import smtplib
import ssl
import time
import uuid
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from runner import safe_files
from runner.settings import Settings
from runner.settings.kinds import EMAIL
from runner.state import StatePaths

SMTP_TIMEOUT = 30.0  # seconds per SMTP operation; a refused or silent server is retried by the task
MESSAGE_DOMAIN = "dify-local.localhost"


def build_message(sender: str, to: str, subject: str, text: str, html: str | None = None) -> EmailMessage:
    if not isinstance(to, str) or not EMAIL.match(to):
        shown = to[:80] + "…" if isinstance(to, str) and len(to) > 80 else to  # it may be a megabyte long
        raise ValueError(f"{shown!r} is not an e-mail address")
    if "\n" in subject or "\r" in subject:
        raise ValueError("a subject is one line")
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender, to, subject
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=MESSAGE_DOMAIN)
    message.set_content(text)
    if html:
        message.add_alternative(html, subtype="html")
    return message


def write_to_outbox(paths: StatePaths, message: EmailMessage) -> str:
    """The file appears whole or not at all, never through a link in the state folder; returns its name."""
    stamp = time.time()  # to the microsecond, so that names sort in the order the mails were written
    name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(stamp))}.{int(stamp % 1 * 1e6):06d}Z-{uuid.uuid4()}.eml"
    safe_files.write_atomic(paths.root, paths.outbox / name, bytes(message))
    return name


def send_over_smtp(settings: Settings, message: EmailMessage) -> None:
    host, port = settings.SMTP_SERVER, settings.SMTP_PORT
    context = ssl.create_default_context()
    if settings.SMTP_USE_TLS and not settings.SMTP_OPPORTUNISTIC_TLS:
        client: smtplib.SMTP = smtplib.SMTP_SSL(host, port, timeout=SMTP_TIMEOUT, context=context)
    else:
        client = smtplib.SMTP(host, port, timeout=SMTP_TIMEOUT)
    with client:
        if settings.SMTP_USE_TLS and settings.SMTP_OPPORTUNISTIC_TLS:
            client.starttls(context=context)
        if settings.SMTP_USERNAME:
            client.login(settings.SMTP_USERNAME, settings.SMTP_PASSWORD)
        client.send_message(message)


def deliver_message(settings: Settings, paths: StatePaths, message: EmailMessage) -> dict:
    """Deliver as MAIL_TYPE says; what happened, for the task's result."""
    result = {"to": message["To"], "subject": message["Subject"], "message_id": message["Message-ID"]}
    if settings.MAIL_TYPE == "smtp":
        send_over_smtp(settings, message)
        return {**result, "transport": "smtp", "server": f"{settings.SMTP_SERVER}:{settings.SMTP_PORT}"}
    return {**result, "transport": "outbox", "file": write_to_outbox(paths, message)}
