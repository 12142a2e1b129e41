"""Sending many tasks through the API while something is killed, and counting what became of them:
the client side of tests/test_load_under_faults.py.

The senders behave as a real client does: a send answered 503 (the broker is down) or not answered at
all (the API is down) is sent again, so only a 202 makes a task accepted. Whatever ran is read back
from the result backend (the broker) and from task_runs (SQLite), never from the senders' view.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import urllib.error
import uuid
from collections import Counter
from dataclasses import dataclass, field

import redis

from tests.helpers import Http

TASK = "process_trace_tasks"  # one SQLite insert: cheap, and routed to ops_trace
RETRY_PAUSE = 0.1  # seconds a sender waits before sending a refused task again, as a polite client does
RESULT_PREFIX = "celery-task-meta-"


@dataclass
class Sent:
    """What the senders saw: the ids accepted with 202, and how often a send was refused or unanswered."""

    accepted: list[str] = field(default_factory=list)
    refused: Counter = field(default_factory=Counter)  # status → count (503 while the broker is down)
    unanswered: int = 0  # no answer at all (the API was down)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self) -> int:
        with self.lock:
            return len(self.accepted)


class Senders:
    """`threads` clients sending `total` tasks between them, each until its send is accepted."""

    def __init__(self, api: Http, total: int, threads: int = 8, deadline: float = 120):
        self.api, self.total, self.threads = api, total, threads
        self.sent = Sent()
        self._next = iter(range(total))
        self._next_lock = threading.Lock()
        self._deadline = time.monotonic() + deadline
        self._workers = [threading.Thread(target=self._send_all, name=f"sender-{n}", daemon=True)
                         for n in range(threads)]
        self.failures: list[str] = []

    def start(self) -> "Senders":
        for thread in self._workers:
            thread.start()
        return self

    def join(self, timeout: float) -> None:
        for thread in self._workers:
            thread.join(max(0.0, timeout))
        assert not any(thread.is_alive() for thread in self._workers), "the senders did not finish in time"
        assert not self.failures, self.failures[:5]

    def _take(self) -> int | None:
        with self._next_lock:
            return next(self._next, None)

    def _send_all(self) -> None:
        while (number := self._take()) is not None:
            self._send(number)

    def _send(self, number: int) -> None:
        body = {"args": [f"load-{uuid.uuid4().hex[:8]}", f"trace {number}", {"n": number}]}
        while time.monotonic() < self._deadline:
            try:
                status, answer = self.api.post(f"/v1/tasks/{TASK}", body, timeout=30)
            except (urllib.error.URLError, OSError):  # refused or cut off: the API is restarting
                with self.sent.lock:
                    self.sent.unanswered += 1
                time.sleep(RETRY_PAUSE)
                continue
            if status == 202:
                with self.sent.lock:
                    self.sent.accepted.append(answer["id"])
                return
            with self.sent.lock:
                self.sent.refused[status] += 1
            if status != 503:  # not a fault of the stack's: a bug the test must show
                self.failures.append(f"send {number}: {status} {answer}")
                return
            time.sleep(RETRY_PAUSE)
        self.failures.append(f"send {number}: not accepted before the deadline")


@dataclass
class Outcome:
    """What became of the accepted tasks, read from the backend and task_runs."""

    accepted: list[str]
    results: dict[str, str]  # id → state in the result backend (only ids that have one)
    rows: dict[str, tuple[str, int]]  # id → (state, attempts) in task_runs

    @property
    def ran(self) -> set[str]:
        return {task for task in self.accepted
                if self.results.get(task) == "SUCCESS" or self.rows.get(task, ("", 0))[0] == "SUCCESS"}

    @property
    def lost(self) -> list[str]:
        return [task for task in self.accepted if task not in self.ran]

    @property
    def without_row(self) -> list[str]:
        return [task for task in self.accepted if task not in self.rows]

    @property
    def wrong_rows(self) -> dict[str, tuple[str, int]]:
        """Rows whose state is not SUCCESS although the task ran."""
        return {task: self.rows.get(task) for task in self.ran if self.rows.get(task, ("", 0))[0] != "SUCCESS"}

    @property
    def run_again(self) -> int:
        return sum(1 for task in self.accepted if self.rows.get(task, ("", 0))[1] > 1)


def read_outcome(broker_url: str, database, accepted: list[str]) -> Outcome:
    client = redis.Redis.from_url(broker_url, socket_timeout=10, protocol=2)
    try:
        results: dict[str, str] = {}
        for start in range(0, len(accepted), 500):
            chunk = accepted[start:start + 500]
            for task, raw in zip(chunk, client.mget([RESULT_PREFIX + task for task in chunk]), strict=True):
                if raw is not None:
                    results[task] = json.loads(raw)["status"]
    finally:
        client.close()
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as connection:
        rows = {task: (state, attempts) for task, state, attempts
                in connection.execute("SELECT id, state, attempts FROM task_runs WHERE name = ?", [TASK])}
    return Outcome(list(accepted), results, rows)


def report(scenario: str, sent: Sent, outcome: Outcome) -> str:
    """The counts, one line (shown by `pytest -s`, and in every failure message)."""
    refused = ", ".join(f"{count}×{status}" for status, count in sorted(sent.refused.items())) or "none"
    return (f"{scenario}: accepted {len(outcome.accepted)} · ran {len(outcome.ran)} · lost {len(outcome.lost)} · "
            f"rows {sum(1 for task in outcome.accepted if task in outcome.rows)} · "
            f"wrong rows {len(outcome.wrong_rows)} · run more than once {outcome.run_again} · "
            f"refused {refused} · unanswered {sent.unanswered}")


def where_are(broker_url: str, tasks: list[str]) -> dict[str, str]:
    """Where on the broker each of `tasks` is now (for a failure message): in a queue, held
    unacknowledged by a worker (kombu's `unacked` hash), or nowhere."""
    client = redis.Redis.from_url(broker_url, socket_timeout=10, protocol=2)
    try:
        found = {task: "nowhere on the broker" for task in tasks}
        for tag, raw in client.hscan_iter("unacked"):
            task = json.loads(raw)[0]["headers"].get("id")
            if task in found:
                taken = client.zscore("unacked_index", tag)
                found[task] = f"unacknowledged (delivery tag {tag.decode()}, taken at {taken})"
        for key in client.scan_iter(match="ops_trace*"):
            if client.type(key) == b"list":
                for raw in client.lrange(key, 0, -1):
                    task = json.loads(raw)["headers"].get("id")
                    if task in found:
                        found[task] = f"waiting in {key.decode()!r}"
        return found
    finally:
        client.close()


def received_by_a_worker(lines: list[str], task: str) -> bool:
    """Whether a worker logged that it took `task` (Celery's "Task NAME[ID] received", which comes
    after kombu wrote the message into its `unacked` hash)."""
    return any(f"[{task}] received" in line for line in lines)
