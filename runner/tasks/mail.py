"""Mail (queue mail): notification mail rendered from runner/mail_templates and delivered to the
local outbox (one .eml file per mail) or to SMTP (MAIL_TYPE=smtp). An SMTP server that refuses or
does not answer is retried with backoff, as every task is; a bad address fails at once."""

from __future__ import annotations

import secrets
from itertools import groupby

from runner import mail_templates
from runner.context import AppContext
from runner.mail_delivery import build_message, deliver_message
from runner.tasks.base import context, now, task

RESET_CODE_DIGITS = 6


def deliver(ctx: AppContext, to: str, subject: str, body: str, html: str | None = None) -> dict:
    """Build one mail from the settings' sender and deliver it as MAIL_TYPE says."""
    message = build_message(ctx.settings.MAIL_DEFAULT_SEND_FROM, to, subject, body, html)
    return deliver_message(ctx.settings, ctx.paths, message)


def deliver_template(ctx: AppContext, to: str, template: str, **values) -> dict:
    mail = mail_templates.render(template, to=to, **values)
    return {**deliver(ctx, to, mail.subject, mail.text, mail.html), "template": template}


@task("send_mail_task")
def send_mail_task(self, to: str, subject: str, body: str) -> dict:
    """Deliver a notification mail."""
    return deliver(context(self), to, subject, body)


@task("send_reset_password_mail_task")
def send_reset_password_mail_task(self, to: str, code: str = "") -> dict:
    """Mail a password-reset code (a new one when none is given), valid RESET_PASSWORD_TOKEN_EXPIRY_MINUTES."""
    ctx = context(self)
    if code and not (code.isascii() and code.isalnum() and len(code) <= 64):
        raise ValueError("a reset code is 1 to 64 letters and digits")
    code = code or "".join(secrets.choice("0123456789") for _ in range(RESET_CODE_DIGITS))
    minutes = ctx.settings.RESET_PASSWORD_TOKEN_EXPIRY_MINUTES
    result = deliver_template(ctx, to, "reset_password", code=code, expiry_minutes=minutes)
    stamp = now()
    with ctx.database.transaction() as db:
        db.execute("INSERT OR REPLACE INTO tokens (token, purpose, email, created_at, expires_at) "
                   "VALUES (?, 'reset_password', ?, ?, ?)", [code, to, stamp, stamp + minutes * 60])
    return {**result, "expires_at": stamp + minutes * 60}


@task("send_indexing_finished_mail_task")
def send_indexing_finished_mail_task(self, to: str, document_id: str) -> dict:
    """Tell someone a document finished indexing (completed, or error with its reason)."""
    ctx = context(self)
    with ctx.database.connect() as db:
        rows = list(db.query("SELECT d.name, d.status, d.error, d.segment_count, s.name AS dataset_name "
                             "FROM documents d JOIN datasets s ON s.id = d.dataset_id WHERE d.id = ?",
                             [document_id]))
    if not rows:
        raise LookupError(f"no document {document_id!r}")
    row = rows[0]
    return deliver_template(ctx, to, "indexing_finished", document_name=row["name"], dataset_name=row["dataset_name"],
                            status=row["status"], error=row["error"], segments=row["segment_count"])


@task("send_queue_alert_mail_task")
def send_queue_alert_mail_task(self, to: str, queue: str, depth: int, threshold: int, checked_at: str) -> dict:
    """Alert someone that a queue holds more tasks than the monitor's threshold."""
    return deliver_template(context(self), to, "queue_alert", queue=queue, depth=depth, threshold=threshold,
                            checked_at=checked_at)


@task("mail_clean_document_notify_task")
def mail_clean_document_notify_task(self) -> dict:
    """Tell each owner which of their datasets the clean-up removed, once."""
    ctx = context(self)
    with ctx.database.connect() as db:
        pending = list(db.query("SELECT id, dataset_name, owner_email FROM dataset_cleanups "
                                "WHERE notified_at IS NULL AND owner_email IS NOT NULL ORDER BY owner_email"))
    mails = 0
    for owner, rows in groupby(pending, key=lambda row: row["owner_email"]):
        rows = list(rows)
        deliver_template(ctx, owner, "datasets_cleaned", names=[row["dataset_name"] for row in rows])
        # noted per owner: a retry after a failed delivery does not mail the owners served before it again
        with ctx.database.transaction() as db:
            db.execute(f"UPDATE dataset_cleanups SET notified_at = ? WHERE id IN ({','.join('?' * len(rows))})",
                       [now(), *[row["id"] for row in rows]])
        mails += 1
    return {"mails": mails, "datasets": len(pending)}
