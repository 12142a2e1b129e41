"""Compatibility: the same Celery scenarios against the embedded broker (`dify-local serve broker`,
a real process) and against a real redis-server, each scenario once per broker.

Workers and beat are real `celery` processes running `tests.support.compat_app` (threads pool);
tasks leave a trace of every run in the broker's Redis, which the tests read. One worker per broker
serves the scenarios that leave it as they found it; the priority and kill -9 scenarios start their
own. One scenario is the Redis command under Celery's consumption, checked with redis-py alone
(a pop waiting on several lists), on a server of its own.

Waits are on conditions with deadlines; timing assertions are lower bounds the broker or the
worker guarantee (a task never runs before its ETA), never upper bounds a slow machine could miss.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import redis
from celery import Celery, chain, chord, group
from celery.result import AsyncResult

from tests.conftest import Project, start_real_redis
from tests.helpers import BIN, REPO, Proc, base_env, free_port, wait_until
from tests.support.compat_app import BEAT_INTERVAL, create_app

pytestmark = pytest.mark.processes  # (their own brokers and stacks: never `unit`)

CELERY = str(BIN / "celery")
APP = "tests.support.compat_app"
TIMEOUT = 30  # seconds for one result; generous on a shared, noisy machine
SHARED_QUEUES = ("compat", "compat.beat")


@dataclass
class Broker:
    """One broker under test: its base URL (no database), and the Celery processes started on it."""

    kind: str
    base_url: str
    folder: Path
    procs: list[Proc] = field(default_factory=list)
    apps: list[Celery] = field(default_factory=list)

    def url(self, db: int = 1) -> str:
        return f"{self.base_url}/{db}"

    def client(self, db: int = 1) -> redis.Redis:
        return redis.Redis.from_url(self.url(db), decode_responses=True)

    def app(self, db: int = 1, **options) -> Celery:
        app = create_app(self.url(db), **options)
        self.apps.append(app)
        return app

    def celery(self, *args: str, db: int = 1, env: dict | None = None) -> Proc:
        environment = base_env(PYTHONPATH=str(REPO), COMPAT_BROKER_URL=self.url(db), **(env or {}))
        proc = Proc([CELERY, "-A", APP, *args], REPO, environment)
        self.procs.append(proc)
        return proc

    def start_worker(self, queues: str, *, db: int = 1, concurrency: int = 4, env: dict | None = None) -> Proc:
        """A worker with a unique node name; returned as soon as it started (see `ready`)."""
        name = f"compat-{self.kind}-{uuid.uuid4().hex[:8]}@%h"
        return self.celery("worker", "--pool", "threads", "-c", str(concurrency), "-n", name, "-Q", queues,
                           "--prefetch-multiplier", "1", "--without-mingle", "--without-gossip", "-l", "INFO",
                           db=db, env=env)

    def cleanup(self) -> None:
        for app in self.apps:
            app.close()
        for proc in self.procs:
            proc.cleanup()


def ready(worker: Proc, timeout: float = 60) -> str:
    """Wait until the worker says it is ready; its node name."""
    return worker.wait_for_line(r"(\S+@\S+) ready\.", timeout=timeout).group(1)


def traces(client: redis.Redis, key: str) -> list[dict]:
    return [json.loads(line) for line in client.lrange(key, 0, -1)]


def wait_for_traces(client: redis.Redis, key: str, count: int, timeout: float = TIMEOUT, proc: Proc | None = None):
    try:
        wait_until(lambda: client.llen(key) >= count, timeout, f"{count} runs traced on {key}")
    except AssertionError as error:
        raise AssertionError(f"{error}; traced: {traces(client, key)}\n{proc.output if proc else ''}") from None
    return traces(client, key)


def fresh(name: str) -> str:
    return f"compat:{name}:{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module", params=["embedded", "redis"])
def broker(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    procs: list[Proc] = []
    try:
        if request.param == "embedded":
            project = Project(folder, free_port(), free_port())
            procs = project.procs
            project.serve_broker()
            base_url = project.broker_url.rsplit("/", 1)[0]
        else:
            base_url, proc = start_real_redis(folder)
            procs.append(proc)
        made = Broker(request.param, base_url, folder)
        try:
            yield made
        finally:
            made.cleanup()
    finally:
        for proc in procs:
            proc.cleanup()


@dataclass
class Shared:
    app: Celery
    node: str
    worker: Proc
    client: redis.Redis

    def sig(self, name: str, *args, **options):
        return self.app.signature(f"compat.{name}", args=args, **options)

    def send(self, name: str, *args, **options) -> AsyncResult:
        return self.app.send_task(f"compat.{name}", args=args, **options)


@pytest.fixture(scope="module")
def shared(broker):
    """The worker the non-destructive scenarios share (database 1, queues compat and compat.beat)."""
    worker = broker.start_worker(",".join(SHARED_QUEUES))
    node = ready(worker)
    yield Shared(broker.app(), node, worker, broker.client())


# -- what a worker waits with ------------------------------------------------------------------------


@pytest.mark.parametrize("pop, push", [("brpop", "lpush"), ("blpop", "rpush"), ("bzpopmin", "zadd")])
def test_a_pop_waiting_on_several_keys_is_served_by_a_write_to_any(broker, request, pop, push):
    """Between tasks a worker waits in BRPOP on all its queues (each queue is several lists, one per
    priority), for a second at a time: a message pushed to any of them answers the waiting BRPOP
    at once. (Not only a push to the first key: else each task waits out the rest of that second,
    and the pop answers nil although a list it waits on holds a message.) On a server of its own,
    so that the one blocked client is this test's."""
    if broker.kind == "embedded":
        project = request.getfixturevalue("project")
        project.serve_broker()
        url = project.broker_url
    else:
        url = request.getfixturevalue("redis_server") + "/1"
    waiting = redis.Redis.from_url(url, socket_timeout=TIMEOUT)  # longer than the pop's own timeout
    writer = redis.Redis.from_url(url, decode_responses=True)
    keys = ["queue-a", "queue-b", "queue-c"]
    outcome: dict = {}

    def wait() -> None:
        outcome["popped"] = getattr(waiting, pop)(keys, timeout=5)

    for target in keys[1:]:
        outcome.clear()
        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        try:
            wait_until(lambda: writer.info("clients")["blocked_clients"] == 1, TIMEOUT, f"{pop} to wait")
            getattr(writer, push)(target, {"job": 1} if push == "zadd" else "job")
        finally:
            thread.join(TIMEOUT)
        expected = (target.encode(), b"job", 1.0) if pop == "bzpopmin" else (target.encode(), b"job")
        got = outcome.get("popped", "nothing")
        assert got == expected, f"{pop} {keys} answered {got} after a {push} to {target}"


# -- canvas -------------------------------------------------------------------------------------------


def test_chain(shared):
    result = chain(shared.sig("add", 1, 2), shared.sig("mul", 10), shared.sig("add", 5)).apply_async()
    assert result.get(timeout=TIMEOUT) == 35
    assert result.parent.get(timeout=TIMEOUT) == 30 and result.parent.parent.get(timeout=TIMEOUT) == 3


def test_group(shared):
    result = group(shared.sig("add", i, i) for i in range(20)).apply_async()
    assert result.get(timeout=TIMEOUT) == [2 * i for i in range(20)]
    assert result.successful() and len(result.results) == 20


def test_chord(shared):
    result = chord(shared.sig("add", i, i) for i in range(10))(shared.sig("tsum"))
    assert result.get(timeout=TIMEOUT) == 90
    header = result.parent
    assert [part.get(timeout=TIMEOUT) for part in header.results] == [2 * i for i in range(10)]
    # A chord whose header has a chain in it, and a failing one: the callback gets the error.
    nested = chord([chain(shared.sig("add", 1, 1), shared.sig("mul", 3)), shared.sig("add", 4, 4)])(
        shared.sig("tsum"))
    assert nested.get(timeout=TIMEOUT) == 14
    failing = chord([shared.sig("add", 1, 1), shared.sig("boom", "in a chord")])(shared.sig("tsum"))
    with pytest.raises(ValueError, match="in a chord"):  # the header's error, raised by get
        failing.get(timeout=TIMEOUT)
    # The callback does not run: the backend marks it failed with the header's error.
    wait_until(lambda: failing.state == "FAILURE", TIMEOUT, "the chord's callback to be marked FAILURE")
    assert type(failing.result).__name__ == "ChordError" and "in a chord" in str(failing.result)


# -- time ---------------------------------------------------------------------------------------------


def test_countdown_and_eta(shared):
    key = fresh("eta")
    sent = time.time()
    by_countdown = shared.send("record", key, "countdown", countdown=2)
    by_eta = shared.send("record", key, "eta", eta=datetime.now(timezone.utc) + timedelta(seconds=2))
    assert by_countdown.get(timeout=TIMEOUT) == "countdown" and by_eta.get(timeout=TIMEOUT) == "eta"
    runs = {run["value"]: run for run in traces(shared.client, key)}
    assert set(runs) == {"countdown", "eta"}
    for run in runs.values():  # never before the ETA (a few ms for the ETA's rounding to microseconds)
        assert run["time"] >= sent + 2 - 0.01, f"ran {run['time'] - sent:.3f} s after sending"


def test_rate_limit_spaces_runs(shared):
    """compat.limited is limited to 120/m: one run per 0.5 s, so 5 runs span 2 s at least (the
    assertion asks for half of it); without the limit, four threads would run them all at once."""
    key = fresh("limited")
    for _ in range(5):
        shared.send("limited", key)
    runs = sorted(run["time"] for run in wait_for_traces(shared.client, key, 5, proc=shared.worker))
    assert runs[-1] - runs[0] >= 1.0, f"5 runs within {runs[-1] - runs[0]:.3f} s"


def test_retries_with_backoff(shared):
    key, exhausted_key = fresh("flaky"), fresh("exhausted")
    result = shared.send("flaky", key, 3)  # fails twice, succeeds on its third run
    exhausted = shared.send("flaky_once", exhausted_key, 99)  # one retry allowed: two runs, then FAILURE
    assert result.get(timeout=TIMEOUT) == 3
    runs = traces(shared.client, key)
    assert [run["retries"] for run in runs] == [0, 1, 2] and len({run["id"] for run in runs}) == 1
    first_gap, second_gap = runs[1]["time"] - runs[0]["time"], runs[2]["time"] - runs[1]["time"]
    assert first_gap >= 1 - 0.01 and second_gap >= 2 - 0.01, (first_gap, second_gap)  # backoff 1 s, then 2 s
    with pytest.raises(Exception) as error:
        exhausted.get(timeout=TIMEOUT)
    assert type(error.value).__name__ == "Flaky" and exhausted.state == "FAILURE"
    assert [run["retries"] for run in traces(shared.client, exhausted_key)] == [0, 1]


# -- results ------------------------------------------------------------------------------------------


def test_result_get_and_forget(shared):
    result = shared.send("add", 2, 2)
    assert result.get(timeout=TIMEOUT) == 4 and result.state == "SUCCESS"
    meta = f"celery-task-meta-{result.id}"
    assert json.loads(shared.client.get(meta))["result"] == 4
    assert 0 < shared.client.ttl(meta) <= 3600  # result_expires
    result.forget()
    assert not shared.client.exists(meta)
    assert AsyncResult(result.id, app=shared.app).state == "PENDING"

    failed = shared.send("boom", "bad input")
    with pytest.raises(ValueError, match="bad input"):
        failed.get(timeout=TIMEOUT)
    assert failed.state == "FAILURE" and "bad input" in failed.traceback
    assert isinstance(failed.get(propagate=False), ValueError)


# -- control ------------------------------------------------------------------------------------------


def test_inspect_ping_active_registered(shared):
    inspect = shared.app.control.inspect(destination=[shared.node], timeout=5)
    assert inspect.ping() == {shared.node: {"ok": "pong"}}
    registered = inspect.registered()[shared.node]
    assert {"compat.add", "compat.tsum", "compat.block"} <= {entry.split()[0] for entry in registered}
    assert "compat.limited [rate_limit=120/m]" in registered

    key, release = fresh("block"), fresh("release")
    running = shared.send("block", key, release)
    later = shared.send("record", fresh("later"), "later", countdown=60)
    try:
        wait_for_traces(shared.client, key, 1, proc=shared.worker)
        active = inspect.active()[shared.node]
        assert [(task["id"], task["name"]) for task in active] == [(running.id, "compat.block")]
        scheduled = wait_until(lambda: inspect.scheduled()[shared.node], TIMEOUT, "the countdown task held")
        assert [entry["request"]["id"] for entry in scheduled] == [later.id]
    finally:
        shared.client.set(release, "1")
        shared.app.control.revoke(later.id)
    assert running.get(timeout=TIMEOUT) == "released"
    assert wait_until(lambda: inspect.active()[shared.node] == [], TIMEOUT, "no task active")


def test_revoke(shared):
    key = fresh("revoked")
    doomed = shared.send("record", key, "should not run", countdown=2)
    replies = shared.app.control.revoke(doomed.id, reply=True, destination=[shared.node], timeout=5)
    assert [list(reply) for reply in replies] == [[shared.node]], replies
    wait_until(lambda: doomed.state == "REVOKED", TIMEOUT, f"task {doomed.id} to be marked REVOKED")
    assert shared.client.llen(key) == 0
    kept = shared.send("record", key, "runs")  # the worker still runs what is not revoked
    assert kept.get(timeout=TIMEOUT) == "runs" and [run["value"] for run in traces(shared.client, key)] == ["runs"]


def test_broadcast_control(shared):
    control = shared.app.control
    # A custom command (compat_app.compat_mark) reaches the worker and answers.
    key = fresh("mark")
    replies = control.broadcast("compat_mark", arguments={"key": key, "value": "v"}, reply=True,
                                destination=[shared.node], timeout=5)
    assert [list(reply) for reply in replies] == [[shared.node]] and replies[0][shared.node]["ok"] == shared.node
    assert shared.client.get(key) == f"v@{shared.node}"

    # rate_limit changes the worker's task, as `registered` then shows.
    replies = control.rate_limit("compat.mul", "6000/m", reply=True, destination=[shared.node], timeout=5)
    assert "ok" in replies[0][shared.node], replies
    registered = control.inspect(destination=[shared.node], timeout=5).registered("rate_limit")[shared.node]
    assert "compat.mul [rate_limit=6000/m]" in registered

    # add_consumer: a task waiting on a queue nobody consumed runs once the worker consumes it.
    queue = fresh("extra")
    waiting = shared.send("record", fresh("extra-run"), "extra", queue=queue)
    wait_until(lambda: shared.client.llen(queue) == 1, TIMEOUT, f"the message to wait on {queue}")
    replies = control.add_consumer(queue, reply=True, destination=[shared.node], timeout=5)
    assert "ok" in replies[0][shared.node], replies
    assert waiting.get(timeout=TIMEOUT) == "extra" and shared.client.llen(queue) == 0
    inspect = control.inspect(destination=[shared.node], timeout=5)
    assert queue in {entry["name"] for entry in inspect.active_queues()[shared.node]}
    replies = control.cancel_consumer(queue, reply=True, destination=[shared.node], timeout=5)
    assert "ok" in replies[0][shared.node], replies
    assert queue not in {entry["name"] for entry in inspect.active_queues()[shared.node]}


# -- beat ---------------------------------------------------------------------------------------------


def test_beat_sends_to_a_named_queue(broker, shared, tmp_path):
    key = fresh("beat")
    beat = broker.celery("beat", "-s", str(tmp_path / "beat-schedule"), "--pidfile=", "-l", "INFO",
                         env={"COMPAT_BEAT_QUEUE": "compat.beat", "COMPAT_BEAT_KEY": key})
    try:
        runs = wait_for_traces(shared.client, key, 3, timeout=TIMEOUT + 10 * BEAT_INTERVAL, proc=beat)
    finally:
        beat.cleanup()
    assert {run["routing_key"] for run in runs} == {"compat.beat"}
    assert {run["hostname"] for run in runs} == {shared.node}
    assert len({run["id"] for run in runs}) == len(runs)  # each tick a new task, none delivered twice
    assert "Sending due task compat-tick (compat.beat_tick)" in beat.output


# -- scenarios with workers of their own ----------------------------------------------------------------


def test_priorities(broker):
    """With a backlog waiting, a worker (one thread, prefetch 1) takes priority 0 before 5 before 9
    (Redis transport: lower is sooner), first in first out within one priority."""
    app = broker.app()
    client = broker.client()
    queue, key = fresh("prio"), fresh("prio-runs")
    for i in range(5):
        for priority in (9, 5, 0):
            app.send_task("compat.record", args=(key, f"{priority}-{i}"), queue=queue, priority=priority)
    worker = broker.start_worker(queue, concurrency=1)
    try:
        runs = wait_for_traces(client, key, 15, proc=worker)
    finally:
        worker.cleanup()
    assert [run["value"] for run in runs] == [f"{priority}-{i}" for priority in (0, 5, 9) for i in range(5)]


def test_acks_late_task_is_redelivered_after_its_worker_is_killed(broker):
    """Two workers on database 2 with a 4 s visibility timeout: the one running an acks_late task is
    killed with SIGKILL; the message goes back to the queue and the other worker runs it once."""
    env = {"COMPAT_VISIBILITY_TIMEOUT": "4"}
    queue = fresh("crash")
    workers = [broker.start_worker(queue, db=2, env=env) for _ in range(2)]
    try:
        nodes = [ready(worker) for worker in workers]
        app = broker.app(db=2, visibility_timeout=4)
        client = broker.client(db=2)
        key, hold = fresh("crash-runs"), fresh("hold")
        result = app.send_task("compat.crash_once", args=(key, hold), queue=queue)
        first = wait_for_traces(client, key, 1)[0]
        victim = next(i for i, worker in enumerate(workers) if worker.popen.pid == first["pid"])
        survivor = 1 - victim
        workers[victim].signal(signal.SIGKILL)
        workers[victim].wait(10)
        assert client.hlen("unacked") == 1  # still held for the killed worker, not acknowledged

        assert result.get(timeout=TIMEOUT) == "run 2", workers[survivor].output
        runs = traces(client, key)
        assert [(run["id"], run["hostname"]) for run in runs] == [
            (result.id, nodes[victim]), (result.id, nodes[survivor])]
        wait_until(lambda: client.hlen("unacked") == 0, TIMEOUT, "the redelivered message to be acknowledged")
        assert client.llen(key) == 2  # run once more, not twice more
    finally:
        for worker in workers:
            worker.cleanup()
