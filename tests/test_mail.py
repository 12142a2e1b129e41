"""Mail through a running stack: templates rendered into the local outbox, read back through the
API (every request validated), and delivery to an SMTP server the test runs."""

from __future__ import annotations

import sqlite3
import time

from tests.helpers import free_port, wait_until


def finished(project, task_id: str, timeout: float = 30) -> dict:
    def done():
        status, body = project.api.get(f"/v1/tasks/{task_id}")
        return body if body["state"] in ("SUCCESS", "FAILURE") else None
    return wait_until(done, timeout, f"task {task_id} to finish")


def send(project, task: str, *args) -> dict:
    status, body = project.api.post(f"/v1/tasks/{task}", {"args": list(args)})
    assert status == 202, body
    return finished(project, body["id"])


def test_templated_mail_lands_in_the_outbox_and_reads_through_the_api(project):
    project.up()
    reset = send(project, "send_reset_password_mail_task", "dev@example.com")
    assert reset["state"] == "SUCCESS", reset
    assert reset["result"]["transport"] == "outbox" and reset["result"]["template"] == "reset_password"

    status, listed = project.api.get("/v1/mail?to=dev@example.com")
    assert status == 200 and listed["total"] == 1
    summary = listed["mail"][0]
    assert summary["name"] == reset["result"]["file"] and summary["to"] == "dev@example.com"
    code = summary["subject"].rsplit(" ", 1)[1]
    assert summary["subject"] == f"Your password reset code: {code}" and code.isdigit() and len(code) == 6
    assert summary["from"] == "dify-local <noreply@dify-local.localhost>"
    status, mail = project.api.get(f"/v1/mail/{summary['name']}")
    assert status == 200
    assert code in mail["text"] and "valid for 5 minutes" in mail["text"]
    assert code in mail["html"] and mail["html"].startswith("<!DOCTYPE html>")
    with sqlite3.connect(project.database) as db:
        (email, expires_at), = db.execute("SELECT email, expires_at FROM tokens WHERE token = ?", [code])
    assert email == "dev@example.com" and 200 < expires_at - time.time() <= 300

    # the indexing-finished mail reads the document's row; names are escaped in the HTML part
    with sqlite3.connect(project.database) as db:
        db.execute("INSERT INTO datasets (id, name, created_at, updated_at) VALUES ('ds', 'Docs <A&B>', 0, 0)")
        db.execute("INSERT INTO documents (id, dataset_id, name, status, segment_count, created_at, updated_at) "
                   "VALUES ('doc1', 'ds', 'guide.md', 'completed', 7, 0, 0)")
    indexed = send(project, "send_indexing_finished_mail_task", "owner@example.com", "doc1")
    assert indexed["state"] == "SUCCESS", indexed
    status, mail = project.api.get(f"/v1/mail/{indexed['result']['file']}")
    assert mail["subject"] == "Indexed: guide.md" and mail["to"] == "owner@example.com"
    assert "7 segments can be searched now" in mail["text"] and 'base "Docs <A&B>"' in mail["text"]
    assert "Docs &lt;A&amp;B&gt;" in mail["html"]
    status, listed = project.api.get("/v1/mail?limit=1")
    assert listed["total"] == 2 and [m["name"] for m in listed["mail"]] == [indexed["result"]["file"]]

    # bad input: a clear 4xx, never a traceback
    for path, expected in (("/v1/mail?limit=0", 400), ("/v1/mail?limit=x", 400), ("/v1/mail?color=red", 400),
                           ("/v1/mail?to=nobody", 400), ("/v1/mail/..%2Fmetadata.db", 404),
                           ("/v1/mail/metadata.db", 400), ("/v1/mail/..x.eml", 400), ("/v1/mail/none.eml", 404)):
        status, body = project.api.get(path)
        assert status == expected and body["error"], (path, status, body)
    # the clean-up notice: one mail per owner listing their removed knowledge bases, once
    with sqlite3.connect(project.database) as db:
        db.executemany("INSERT INTO dataset_cleanups (dataset_id, dataset_name, owner_email, cleaned_at) "
                       "VALUES (?, ?, ?, 0)", [("a", "Old notes", "owner@example.com"),
                                               ("b", "Drafts", "owner@example.com"), ("c", "Other", None)])
    notified = send(project, "mail_clean_document_notify_task")
    assert notified["result"] == {"mails": 1, "datasets": 2}
    assert send(project, "mail_clean_document_notify_task")["result"] == {"mails": 0, "datasets": 0}
    newest = project.api.get("/v1/mail?to=owner@example.com&limit=1")[1]["mail"][0]
    mail = project.api.get(f"/v1/mail/{newest['name']}")[1]
    assert mail["subject"] == "Unused knowledge bases were cleaned up"
    assert "- Drafts" in mail["text"] and "- Old notes" in mail["text"]

    # a bad address fails at once (no retries), into the failed tasks
    refused = send(project, "send_reset_password_mail_task", "not-an-address")
    assert refused["state"] == "FAILURE"
    failed = project.run("failed")
    assert "send_reset_password_mail_task" in failed.stdout and "is not an e-mail address" in failed.stdout


class Collector:
    def __init__(self):
        self.messages: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


def test_mail_goes_to_smtp_when_configured(project):
    from aiosmtpd.controller import Controller

    collector = Collector()
    port = free_port()
    controller = Controller(collector, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        project.up(env={"MAIL_TYPE": "smtp", "SMTP_SERVER": "127.0.0.1", "SMTP_PORT": str(port),
                        "SMTP_USE_TLS": "false", "MAIL_DEFAULT_SEND_FROM": "Dify <no-reply@example.com>"})
        result = send(project, "send_mail_task", "ops@example.com", "Over SMTP", "delivered for real")
        assert result["state"] == "SUCCESS", result
        assert result["result"]["transport"] == "smtp" and result["result"]["server"] == f"127.0.0.1:{port}"
        wait_until(lambda: collector.messages, 10, "the SMTP server to receive the mail")
        sender, recipients, content = collector.messages[0]
        assert sender == "no-reply@example.com" and recipients == ["ops@example.com"]
        assert b"Subject: Over SMTP" in content and b"delivered for real" in content
        assert project.api.get("/v1/mail")[1]["total"] == 0  # nothing in the outbox
    finally:
        controller.stop()

    # the server gone: the task retries with backoff (the project's policy: 3 retries), then fails for good
    status, body = project.api.post("/v1/tasks/send_mail_task", {"args": ["ops@example.com", "Later", "retried"]})
    assert status == 202, body
    rows = wait_until(lambda: [row for row in project.api.get("/v1/failed")[1]["failed"]
                               if row["task_id"] == body["id"]], 60, "the undeliverable mail in failed tasks")
    assert rows[0]["retries"] == 3 and "ConnectionRefusedError" in rows[0]["error"], rows[0]
    # the run's record is written by the worker's recorder a moment after the dead letter
    run = wait_until(lambda: (lambda run: run if run.get("attempts") == 4 else None)(
        project.api.get(f"/v1/tasks/{body['id']}")[1]), 10, "the fourth attempt to be recorded")
    assert run["state"] == "FAILURE"
    # back again: sending the failed task again delivers it
    controller = Controller(collector, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        status, sent = project.api.post(f"/v1/failed/{rows[0]['id']}/retry")
        assert status == 202, sent
        assert finished(project, sent["retry_task_id"])["state"] == "SUCCESS"
        assert wait_until(lambda: len(collector.messages) == 2, 10, "the mail sent again")
        assert b"Subject: Later" in collector.messages[1][2]
    finally:
        controller.stop()


def test_smtp_without_a_server_is_a_configuration_error(project):
    result = project.run("config", env={"MAIL_TYPE": "smtp"})
    assert result.returncode == 2 and "SMTP_SERVER=''" in result.stderr
    result = project.run("config", env={"MAIL_DEFAULT_SEND_FROM": "nobody"})
    assert result.returncode == 2 and "MAIL_DEFAULT_SEND_FROM" in result.stderr


ADDRESSES = [  # (address, valid): the shapes the pattern must still tell apart
    ("ops@example.com", True), ("a.b+tag@mail.example.co.uk", True), ("a@b", False), ("a@b.", False),
    ("a@.b", False), ("a@b..c", False), ("a b@c.d", False), ("a@b@c.d", False), ("a@" + "b" * 250 + ".cd", False),
]


def test_an_address_is_checked_in_linear_time():
    """`to` comes from a task's arguments (1 MB through the API): the pattern backtracked."""
    from runner import limited_process
    from runner.mail_delivery import build_message
    from runner.settings.kinds import EMAIL

    for address, valid in ADDRESSES:
        assert bool(EMAIL.match(address)) is valid, address
    hostile = "a@" + ".a" * 200_000 + "@"
    limits = limited_process.Limits(memory=256 << 20, cpu_seconds=20, max_result=4096)
    try:
        limited_process.run(build_message, ("me@example.com", hostile, "s", "b"), limits, "checking the address")
    except limited_process.ChildError as error:
        assert error.kind == "ValueError" and "is not an e-mail address" in str(error)
    else:
        raise AssertionError("the hostile address was accepted")


def test_a_mail_too_large_to_read_whole_is_a_413_and_still_listed(project):
    project.serve_broker()
    api = project.start("serve", "api")
    wait_until(lambda: project.api.status("/health/api") == 200, 30, "the API to answer")
    outbox = project.state / "files" / "outbox"
    outbox.mkdir(parents=True, exist_ok=True)
    name = "20990101T000000.000000Z-big.eml"
    with open(outbox / name, "wb") as mail:
        mail.write(b"From: a@example.com\r\nTo: b@example.com\r\nSubject: big\r\n\r\n")
        mail.write(b"x" * (17 * 1024 * 1024))
    status, body = project.api.get(f"/v1/mail/{name}")
    assert status == 413 and "over 16 MiB" in body["error"], body
    status, body = project.api.get("/v1/mail")
    assert status == 200 and body["mail"][0]["subject"] == "big" and body["mail"][0]["size"] > 17_000_000, body
    assert "Traceback" not in api.output
