"""The task_runs recorder on a real SQLite file: events folded per task, whatever the batching."""

from __future__ import annotations

import json
import logging
import threading

from runner.store.database import Database
from runner.store.migrations import apply_migrations
from runner.store.task_runs import TaskRunRecorder, get_task_run


def recorder(tmp_path) -> TaskRunRecorder:
    database = Database(tmp_path / "metadata.db")
    apply_migrations(database)
    return TaskRunRecorder(database)


def test_start_and_finish_in_one_batch_and_across_batches(tmp_path):
    rec = recorder(tmp_path)
    rec.started("a", "send_mail_task", "mail", ["x@y.z"], {}, "worker@h")
    rec.finished("a", "send_mail_task", "SUCCESS")
    rec.started("b", "send_mail_task", "mail", [], {}, "worker@h")
    rec.stop()
    rec.finished("b", "send_mail_task", "SUCCESS")
    rec.stop()
    a, b = get_task_run(rec.database, "a"), get_task_run(rec.database, "b")
    assert (a["state"], a["attempts"], a["args"], a["queue"], a["worker"]) == ("SUCCESS", 1, '["x@y.z"]', "mail",
                                                                               "worker@h")
    assert a["runtime"] == a["finished_at"] - a["started_at"] >= 0
    assert (b["state"], b["attempts"]) == ("SUCCESS", 1) and b["runtime"] == b["finished_at"] - b["started_at"]


def test_retry_failure_and_a_late_send_record(tmp_path):
    rec = recorder(tmp_path)
    rec.started("r", "document_indexing_task", "dataset", [], {}, "w1")
    rec.finished("r", "document_indexing_task", "RETRY")
    rec.stop()
    rec.started("r", "document_indexing_task", "dataset", [], {}, "w2")
    rec.stop()
    running = get_task_run(rec.database, "r")
    assert (running["state"], running["attempts"], running["worker"]) == ("STARTED", 2, "w2")
    assert running["finished_at"] is None
    rec.failed("r", "document_indexing_task", "ValueError: no text")
    rec.finished("r", "document_indexing_task", "FAILURE")
    # the sender's own record of the send arrives last (another process, another writer)
    rec.queued("r", "document_indexing_task", "dataset", ["kb"], {})
    rec.stop()
    done = get_task_run(rec.database, "r")
    assert (done["state"], done["error"], done["attempts"]) == ("FAILURE", "ValueError: no text", 2)
    assert done["queued_at"] is not None and done["runtime"] is not None


def test_many_threads_recording_at_once(tmp_path):
    rec = recorder(tmp_path)

    def work(offset: int) -> None:
        for number in range(offset, offset + 250):
            rec.started(str(number), "t", "q", [number], {}, "w")
            rec.finished(str(number), "t", "SUCCESS")

    threads = [threading.Thread(target=work, args=(index * 1000,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rec.stop()
    with rec.database.connect() as db:
        rows = db.execute("SELECT COUNT(*), SUM(state = 'SUCCESS'), SUM(attempts) FROM task_runs").fetchone()
    assert tuple(rows) == (1000, 1000, 1000)


def test_a_row_sqlite_cannot_encode_keeps_its_neighbours_and_is_kept_escaped(tmp_path):
    rec = recorder(tmp_path)
    for number in range(5):
        rec.started(f"good{number}", "t", "q", [number], {}, "w")
    # a lone surrogate (a string decoded from bytes that are not UTF-8) in the arguments, the error
    # and the worker's name: SQLite keeps text as UTF-8, which cannot hold it
    rec.started("odd", "t", "q", ["\ud800"], {"k": "\udcff"}, "w\ud800")
    rec.failed("odd", "t", "ValueError: \ud800")
    rec.finished("odd", "t", "FAILURE")
    for number in range(5):
        rec.finished(f"good{number}", "t", "SUCCESS")
    rec.stop()
    assert all(get_task_run(rec.database, f"good{number}")["state"] == "SUCCESS" for number in range(5))
    odd = get_task_run(rec.database, "odd")
    assert odd["state"] == "FAILURE" and json.loads(odd["args"]) == ["\ud800"]  # escaped in JSON: nothing lost
    assert json.loads(odd["kwargs"]) == {"k": "\udcff"}
    assert odd["error"] == "ValueError: \\ud800" and odd["worker"] == "w\\ud800"


def test_a_batch_that_still_fails_is_written_row_by_row_naming_only_the_bad_row(tmp_path, caplog):
    rec = recorder(tmp_path)
    for number in range(5):
        rec.started(f"good{number}", "t", "q", [number], {}, "w")
    rec.finished("bad", "t", object())  # a value SQLite cannot store at all
    for number in range(5):
        rec.finished(f"good{number}", "t", "SUCCESS")
    with caplog.at_level(logging.WARNING, logger="runner.store.task_runs"):
        rec.stop()
    assert all(get_task_run(rec.database, f"good{number}")["state"] == "SUCCESS" for number in range(5))
    assert get_task_run(rec.database, "bad") is None
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and "bad" in lines[0] and "good" not in lines[0], lines
    assert "\n" not in lines[0] and not caplog.records[0].exc_info  # one line, no traceback
