"""Mail (queue mail): notification mail delivered to the local outbox, one .eml file per mail."""

from __future__ import annotations

import os
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from itertools import groupby

from runner.context import AppContext
from runner.settings.kinds import EMAIL
from runner.tasks.base import context, new_id, now, task

SENDER = "dify-local <noreply@dify-local.localhost>"


def deliver(ctx: AppContext, to: str, subject: str, body: str) -> dict:
    """Write one mail to the outbox; the file appears whole or not at all."""
    if not EMAIL.match(to):
        raise ValueError(f"{to!r} is not an e-mail address")
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = SENDER, to, subject
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain="dify-local.localhost")
    message.set_content(body)
    outbox = ctx.paths.outbox
    outbox.mkdir(parents=True, exist_ok=True)
    name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{new_id()}.eml"
    partial = outbox / f".{name}.partial"
    partial.write_bytes(bytes(message))
    os.replace(partial, outbox / name)
    return {"to": to, "subject": subject, "message_id": message["Message-ID"], "file": name}


@task("send_mail_task")
def send_mail_task(self, to: str, subject: str, body: str) -> dict:
    """Deliver a notification mail."""
    return deliver(context(self), to, subject, body)


@task("mail_clean_document_notify_task")
def mail_clean_document_notify_task(self) -> dict:
    """Tell each owner which of their datasets the clean-up removed, once."""
    ctx = context(self)
    with ctx.database.transaction() as db:
        pending = list(db.query("SELECT id, dataset_name, owner_email FROM dataset_cleanups "
                                "WHERE notified_at IS NULL AND owner_email IS NOT NULL ORDER BY owner_email"))
        mails = 0
        for owner, rows in groupby(pending, key=lambda row: row["owner_email"]):
            rows = list(rows)
            names = "\n".join(f"- {row['dataset_name']}" for row in rows)
            deliver(ctx, owner, "Unused knowledge bases were cleaned up",
                    f"These knowledge bases had no activity and were removed:\n{names}\n")
            db.execute(f"UPDATE dataset_cleanups SET notified_at = ? WHERE id IN ({','.join('?' * len(rows))})",
                       [now(), *[row["id"] for row in rows]])
            mails += 1
    return {"mails": mails, "datasets": len(pending)}
