"""The embedded broker keeps what it acknowledged (issue 4, "Durable"), with real processes.

A clean stop (SIGTERM, Ctrl-C) keeps everything; kill -9 loses nothing acknowledged (each reply waits
for its write to be in the file; the fsync each second is what bounds a power loss);
a log cut short or with garbage at its end restores its valid part, sets the rest aside and says so;
the log is compacted and still restores everything; --no-persist writes nothing; and a broker that
anyone on the network could reach without a password refuses to start. A few failures no process
can be made to hit on cue (a partial write, two broken tails in one second) are tried on the log
itself, in-process.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import resource
import signal
import threading
import time
from pathlib import Path

import pytest
import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.lock import Lock
from redis.retry import Retry

from runner.broker import aof as aof_module
from runner.broker.aof import AppendOnlyLog
from tests.helpers import Proc, dify_local, port_open, require_compiled_loop, wait_until

LISTENING = r"embedded broker \(fakeredis [\d.]+, \w+ read loop\) listening on"
SET_ASIDE = re.compile(r"WARNING .*the append-only log ended with (?P<reason>.+): restored everything before it "
                       r"\((?P<writes>\d+) writes\); the last (?P<bytes>\d+) bytes are kept in (?P<path>\S+) ")
NO_RETRY = Retry(NoBackoff(), 0)


# -- helpers ----------------------------------------------------------------------------------------


def log_of(project) -> Path:
    return project.state / "broker" / "appendonly.aof"


def log_bytes(project) -> bytes:
    path = log_of(project)
    return path.read_bytes() if path.exists() else b""


def start_broker(project, *args: str, env: dict | None = None) -> Proc:
    proc = project.start("serve", "broker", *args, env=env)
    proc.wait_for_line(LISTENING, timeout=60)
    wait_until(lambda: port_open(project.broker_port), 30, "the embedded broker to listen")
    return proc


def stop(proc: Proc, signum: int = signal.SIGTERM) -> None:
    """A clean stop: SIGTERM to the broker, or Ctrl-C (the terminal signals the whole process group)."""
    if signum == signal.SIGINT:
        os.killpg(proc.popen.pid, signal.SIGINT)
    else:
        proc.signal(signum)
    assert proc.wait(60) == 0, proc.output
    assert "embedded broker stopped" in proc.output
    assert "Traceback" not in proc.output, proc.output


def kill9(proc: Proc) -> None:
    proc.signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


def connect(project, db: int = 1) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=project.broker_port, password=project.broker_password, db=db,
                       socket_timeout=30)


def persistence(project) -> dict:
    with connect(project) as client:
        return client.info("persistence")


def wait_logged(project, marker: bytes) -> None:
    """Until the writer thread has put `marker` in the file (it writes every 0.1 s)."""
    wait_until(lambda: marker in log_bytes(project), 30, f"{marker!r} to reach the append-only log")


def dump(project) -> tuple[dict, dict]:
    """Every key of every database: (type, value), and its absolute expiry in ms (-1: none)."""
    with connect(project, 0) as client:
        dbs = sorted(int(name[2:]) for name in client.info("keyspace"))
    data, expiry = {}, {}
    for db in dbs:
        with connect(project, db) as client:
            read = {b"string": client.get, b"list": lambda key: client.lrange(key, 0, -1), b"hash": client.hgetall,
                    b"set": client.smembers, b"zset": lambda key: client.zrange(key, 0, -1, withscores=True)}
            for key in sorted(client.keys("*")):
                kind = client.type(key)
                data[(db, key)] = (kind, read[kind](key))
                expiry[(db, key)] = client.pexpiretime(key)
    return data, expiry


def assert_same(before: tuple[dict, dict], after: tuple[dict, dict]) -> None:
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys()
    for key, when in before[1].items():
        # the same deadline, so the time to live kept counting while the broker was down
        # (compaction writes it back from the remaining ms: at most a millisecond of rounding)
        assert (when == -1) == (after[1][key] == -1) and abs(after[1][key] - when) <= 2, (key, when, after[1][key])


def kombu_message(n: int) -> bytes:
    body = base64.b64encode(json.dumps([[n], {}, {}]).encode()).decode()
    return json.dumps({"body": body, "content-encoding": "utf-8", "content-type": "application/json",
                       "headers": {"id": f"task-{n}", "task": "tasks.work"},
                       "properties": {"delivery_tag": f"tag-{n}", "body_encoding": "base64"}}).encode()


# -- 1. a clean stop keeps everything ----------------------------------------------------------------


def test_a_clean_stop_and_start_keeps_every_kind_of_data(project):
    broker = start_broker(project)
    db1 = connect(project, 1)
    # what Celery and kombu keep in the broker
    db1.lpush("celery", *(kombu_message(n) for n in range(5)))
    db1.lpush("celery\x06\x163", kombu_message(99))  # a priority step's list
    db1.sadd("_kombu.binding.celery", "celery\x06\x16\x06\x16celery")
    db1.hset("unacked", mapping={f"tag-{n}": json.dumps([kombu_message(n).decode(), "", "celery"]) for n in (7, 8)})
    db1.zadd("unacked_index", {"tag-7": 1795489020.123456, "tag-8": 1795489021.5})
    db1.set("celery-task-meta-abc", json.dumps({"status": "SUCCESS", "result": 42}), ex=86400)
    lock = db1.lock("dify-lock", timeout=120)  # SET NX PX
    assert lock.acquire(blocking=False)
    token = db1.get("dify-lock")
    # every other type, and awkward bytes
    db1.set("plain", "value")
    db1.set(b"bin\x00\r\nkey", b"\x00\xff\r\n*1\r\n$3\r\nset\r\n")  # a value that looks like the log's format
    db1.set("empty", "")
    db1.hset("hash", mapping={"a": "1", "b": "2"})
    db1.sadd("set", "x", "y", "z")
    db1.incrby("counter", 5)
    db1.set("relative", "x")
    db1.expire("relative", 500)  # a relative expiry, logged as an absolute one
    db1.set("persisted", "x", ex=500)
    db1.persist("persisted")
    db1.set("deleted", "x")
    db1.delete("deleted")
    db1.set("expired-while-up", "x", px=50)
    wait_until(lambda: db1.get("expired-while-up") is None, 10, "a 50 ms key to expire")
    # other databases
    connect(project, 0).set("db0-key", "zero")
    connect(project, 2).rpush("db2-queue", "a", "b")
    connect(project, 15).hset("db15-hash", "f", "v")
    before = dump(project)
    assert {db for db, _ in before[0]} == {0, 1, 2, 15}
    assert before[1][(1, b"celery-task-meta-abc")] > 0 and before[1][(1, b"dify-lock")] > 0
    assert before[1][(1, b"persisted")] == -1
    # a key whose time runs out while the broker is down
    db1.set("short", "x", px=1500)
    short_deadline = db1.pexpiretime("short") / 1000
    ttl_before = db1.pttl("celery-task-meta-abc")
    db1.close()

    stop(broker, signal.SIGTERM)
    wait_until(lambda: time.time() > short_deadline + 0.05, 10, "the short key's deadline to pass")  # about time
    broker = start_broker(project)
    assert re.search(r"restored \d+ writes from .*appendonly\.aof", broker.output)
    assert_same(before, dump(project))
    db1 = connect(project, 1)
    assert db1.exists("short", "expired-while-up", "deleted") == 0  # expired and deleted stay gone
    assert 0 < db1.pttl("celery-task-meta-abc") < ttl_before  # still counting down
    assert not db1.lock("dify-lock", timeout=120).acquire(blocking=False)  # still held
    assert db1.get("dify-lock") == token

    # a second round: consume, ack, delete, release the lock; many overwrites; Ctrl-C
    assert db1.rpop("celery") == kombu_message(0)
    db1.hdel("unacked", "tag-7")
    db1.zrem("unacked_index", "tag-7")
    db1.delete("plain")
    held = Lock(db1, "dify-lock", timeout=120)
    held.local.token = token
    held.release()  # by the token it was taken with (a Lua script)
    for _ in range(300):
        db1.incr("counter")
    connect(project, 3).set("db3-key", "three")
    wait_logged(project, b"db3-key")  # (see the next test for a stop before the writer caught up)
    before = dump(project)
    assert (1, b"dify-lock") not in before[0] and before[0][(1, b"counter")] == (b"string", b"305")
    db1.close()
    stop(broker, signal.SIGINT)
    broker = start_broker(project)
    assert_same(before, dump(project))
    # the clean stop compacted the log: 300 INCRs came back as one SET
    assert 0 < persistence(project)["aof_loaded_commands"] < 100
    stop(broker)


def test_a_clean_stop_right_after_writes_still_compacts_the_log(project):
    broker = start_broker(project)
    with connect(project) as db1:
        for _ in range(300):
            db1.incr("counter")
    stop(broker)
    broker = start_broker(project)
    assert connect(project).get("counter") == b"300"  # (the data is safe either way)
    assert persistence(project)["aof_loaded_commands"] < 100
    stop(broker)


# -- 2. kill -9 during an enqueue ------------------------------------------------------------------------

TOTAL = 5000
KILL_AFTER = 2500  # acknowledged messages before the kill
EARLY = 1000  # at least this many acknowledged long enough before the kill
MARGIN = 1.5  # "long enough": the log's promise is one second (everysec), this leaves half a second more
RATE = 1000  # messages per second at most, so the kill always lands in the middle of the enqueue
QUEUE = "durability"


class Enqueuer(threading.Thread):
    """Celery's send_task to the embedded broker, noting when each was acknowledged (its reply came)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.app = Celery("durability", broker=url, set_as_current=False)
        self.acked: list[float] = []  # time.monotonic() of each reply, in the order sent
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        started = time.monotonic()
        try:
            for n in range(TOTAL):
                if self.halt.is_set():
                    return
                pause = started + n / RATE - time.monotonic()
                if pause > 0:
                    time.sleep(pause)  # pacing (the test is about time), not synchronisation
                self.app.send_task("durability.work", args=[n], task_id=f"task-{n:05d}", queue=QUEUE, retry=False)
                self.acked.append(time.monotonic())
        except BaseException as error:  # the kill: the send in flight fails
            self.error = error
        finally:
            try:
                self.app.close()
            except Exception:  # closing connections to a dead broker
                pass


def enqueue_and_kill(project, broker: Proc, end=kill9) -> tuple[list[float], float]:
    """Enqueue and, halfway, end the broker (`kill9`, or `stop` for a clean stop); what was
    acknowledged (when each reply came) and when the broker was ended."""
    sender = Enqueuer(project.broker_url)
    sender.start()
    try:
        def ready() -> bool:
            if sender.error is not None:
                raise AssertionError(f"the enqueue failed before the kill: {sender.error!r}")
            acked = sender.acked
            return len(acked) >= KILL_AFTER and acked[EARLY - 1] < time.monotonic() - MARGIN - 0.2
        wait_until(ready, 180, f"{KILL_AFTER} acknowledged messages, {EARLY} of them {MARGIN} s old", interval=0.01)
        killed_at = time.monotonic()
        end(broker)
    finally:
        sender.halt.set()
        sender.join(60)
    assert not sender.is_alive()
    acked = list(sender.acked)
    assert KILL_AFTER <= len(acked) < TOTAL, "the kill should land in the middle of the enqueue"
    return acked, killed_at


def queued_tasks(project) -> list[int]:
    """The task numbers in the queue, oldest first, each checked to be a whole message we sent."""
    with connect(project) as client:
        raw = client.lrange(QUEUE, 0, -1)
    numbers = []
    for item in reversed(raw):  # LPUSH: the oldest is at the tail
        message = json.loads(item)
        n = json.loads(base64.b64decode(message["body"]))[0][0]
        assert message["headers"]["id"] == f"task-{n:05d}" and message["headers"]["task"] == "durability.work"
        numbers.append(n)
    return numbers


@pytest.mark.timeout(600)
def test_kill_9_during_an_enqueue_loses_nothing_acknowledged(project):
    """Through Celery: every message whose send was acknowledged is in the log before the reply
    (issue 16 point 3; test_broker_acknowledged.py has the same for each way a write comes)."""
    broker = start_broker(project)
    acked, _ = enqueue_and_kill(project, broker)
    broker = start_broker(project)
    numbers = queued_tasks(project)
    assert len(numbers) == len(set(numbers)), "a message came back twice"
    # the log loses a tail, never a hole: what is there is the first n messages sent, in order, and
    # n is every acknowledged one (+ the one in flight at the kill, whose write may have gone in)
    assert numbers == list(range(len(numbers)))
    assert len(acked) <= len(numbers) <= len(acked) + 1
    with connect(project) as client:
        assert client.smembers(f"_kombu.binding.{QUEUE}")  # kombu's routing, written before the messages
    if "the append-only log ended with" in broker.output:  # the kill cut a write: said, and set aside
        assert SET_ASIDE.search(broker.output) and list(log_of(project).parent.glob("appendonly.aof.broken-*"))
    stop(broker)


@pytest.mark.timeout(600)
def test_a_clean_restart_during_an_enqueue_keeps_every_acknowledged_message(project):
    broker = start_broker(project)
    acked, _ = enqueue_and_kill(project, broker, end=stop)  # SIGTERM: the log is flushed before the exit
    broker = start_broker(project)
    numbers = queued_tasks(project)
    # every acknowledged message, in order, and at most the one in flight when the broker stopped
    assert numbers[:len(acked)] == list(range(len(acked)))
    assert len(acked) <= len(numbers) <= len(acked) + 1
    assert "the append-only log ended with" not in broker.output  # a clean stop leaves a whole log
    stop(broker)


@pytest.mark.timeout(600)
def test_the_kill_check_fails_when_nothing_is_logged(project):
    """The same enqueue and kill with --no-persist: the check above must see the loss (it can fail)."""
    broker = start_broker(project, "--no-persist")
    acked, killed_at = enqueue_and_kill(project, broker)
    early = sum(1 for moment in acked if moment <= killed_at - MARGIN)
    broker = start_broker(project, "--no-persist")
    numbers = queued_tasks(project)
    assert early >= EARLY and len(numbers) < early  # what the durable run asserts the opposite of
    stop(broker)


# -- 3. a broken log tail -----------------------------------------------------------------------------------

TAIL = b"LAST-WRITE-" + b"z" * 64
GARBAGE = b"\x00\xde\xad\xbe\xef\r\n\x01\x02 not a command\r\n\xff"


def _cut_in_the_name(data: bytes, last: int) -> tuple[bytes, int]:
    return data[:last + 12], last  # "*3\r\n$5\r\nrpu": a crash while the last command was written


def _cut_in_the_value(data: bytes, last: int) -> tuple[bytes, int]:
    return data[:-10], last


def _bad_terminator(data: bytes, last: int) -> tuple[bytes, int]:
    return data[:-2] + b"\x00\x00", last  # the last command's value overruns its length: corruption


def _garbage(data: bytes, last: int) -> tuple[bytes, int]:
    return data + GARBAGE, len(data)


def _text(data: bytes, last: int) -> tuple[bytes, int]:
    # lines that read as inline commands: a log is never written inline, so they must not run
    return data + b"flushall\r\ndel celery\r\n", len(data)


BREAKS = {"cut in the command's name": _cut_in_the_name, "cut in its value": _cut_in_the_value,
          "bad terminator": _bad_terminator, "binary garbage appended": _garbage,
          "text lines appended": _text}


@pytest.mark.parametrize("how", list(BREAKS))
def test_a_broken_log_tail_is_set_aside_and_the_rest_restored(project, how):
    broker = start_broker(project)
    db1 = connect(project, 1)
    db1.lpush("celery", kombu_message(1), kombu_message(2))
    db1.hset("unacked", "tag-1", "x")
    db1.zadd("unacked_index", {"tag-1": 1.5})
    db1.set("celery-task-meta-1", "done", ex=1000)
    db1.set("relative", "x")
    db1.expire("relative", 500)
    assert db1.lock("dify-lock", timeout=120).acquire(blocking=False)  # SET NX PX
    connect(project, 4).set("db4-key", "four")
    before = dump(project)
    db1.rpush("celery", TAIL)  # the log's last command
    wait_logged(project, TAIL)
    kill9(broker)  # (a clean stop would compact the log; this leaves the commands as they came)
    expected = {"celery": [kombu_message(2), kombu_message(1), TAIL]}
    data = log_bytes(project)
    assert data.endswith(TAIL + b"\r\n")
    last = data.rfind(b"*", 0, data.rindex(TAIL))  # where the last command starts
    broken, good = BREAKS[how](data, last)
    log_of(project).write_bytes(broken)
    if good == last:
        expected["celery"].pop()  # that command was not whole: it is not applied

    broker = start_broker(project)  # starts anyway
    found = SET_ASIDE.search(broker.output)
    assert found, broker.output
    aside = Path(found["path"])
    assert aside.parent == log_of(project).parent and aside.name.startswith("appendonly.aof.broken-")
    assert aside.read_bytes() == broken[good:] and int(found["bytes"]) == len(broken) - good
    assert log_bytes(project) == broken[:good]  # nothing thrown away: the two parts are the file
    assert persistence(project)["aof_set_aside"] == str(aside)
    db1 = connect(project, 1)
    assert db1.lrange("celery", 0, -1) == expected["celery"]
    after = dump(project)
    del before[0][(1, b"celery")], after[0][(1, b"celery")]
    assert_same(before, after)  # the rest exactly, expiry included

    # the repaired log takes new writes, and the next start is clean; the set-aside file stays
    db1.set("after", "1")
    db1.close()
    stop(broker)
    broker = start_broker(project)
    assert "ended with" not in broker.output
    assert connect(project, 1).get("after") == b"1"
    assert connect(project, 1).lrange("celery", 0, -1) == expected["celery"]
    assert aside.read_bytes() == broken[good:]
    stop(broker)


def test_an_unfinished_transaction_is_not_half_applied(project):
    """A crash while a MULTI/EXEC was written: none of it applied, all of it set aside."""
    broker = start_broker(project)
    db1 = connect(project, 1)
    db1.set("before", "1")
    with db1.pipeline(transaction=True) as pipe:
        pipe.rpush("celery", TAIL).hset("unacked", "tag-9", "x").execute()
    wait_logged(project, b"tag-9")
    kill9(broker)
    data = log_bytes(project)
    multi = data.rfind(b"multi")
    assert multi > 0 and data.rstrip().endswith(b"exec"), data
    start = data.rfind(b"*", 0, multi)
    broken = data[:data.rfind(b"*")]  # cut before EXEC
    log_of(project).write_bytes(broken)
    broker = start_broker(project)
    found = SET_ASIDE.search(broker.output)
    assert found and "transaction" in found["reason"], broker.output
    assert Path(found["path"]).read_bytes() == broken[start:]
    db1 = connect(project, 1)
    assert db1.get("before") == b"1" and db1.exists("celery", "unacked") == 0
    stop(broker)


# -- 4. compaction, SAVE, BGREWRITEAOF, INFO --------------------------------------------------------------


def test_the_log_is_compacted_as_it_grows_and_restores_everything(project):
    """The log is rewritten once it passes 16 MiB and has doubled (aof.REWRITE_MIN_BYTES): no
    periodic rewrite, only that, a clean stop, and SAVE / BGREWRITEAOF."""
    broker = start_broker(project)
    db1 = connect(project, 1)
    db1.lpush("celery", *(kombu_message(n) for n in range(50)))
    db1.hset("unacked", "tag-1", "x")
    db1.zadd("unacked_index", {"tag-1": 2.25})
    db1.set("celery-task-meta-1", "done", ex=1000)
    connect(project, 6).sadd("db6-set", "a", "b")
    chunk = 512 * 1024
    written = 0
    for n in range(40):  # 20 MiB of writes to one key
        value = (b"%04d" % n) * (chunk // 4)
        db1.set("big", value)
        db1.rpush("between", n)  # not idempotent: one written twice around the compaction would show
        written += len(value)
    wait_until(lambda: persistence(project)["aof_rewrites"] >= 1, 60, "the log to be compacted")
    db1.rpush("celery", "after compaction")  # appended to the rewritten file
    wait_logged(project, b"after compaction")
    info = persistence(project)
    assert info["aof_base_size"] < 4 * chunk and info["aof_current_size"] < written / 2
    assert log_of(project).stat().st_size < written / 2
    before = dump(project)
    assert before[0][(1, b"big")] == (b"string", value)
    assert before[0][(1, b"between")] == (b"list", [b"%d" % n for n in range(40)])
    db1.close()
    kill9(broker)  # no compaction at exit: the file as it is must restore everything
    broker = start_broker(project)
    assert_same(before, dump(project))
    stop(broker)


def test_a_log_that_cannot_be_compacted_is_not_snapshotted_after_every_command(project):
    """A stream cannot be written back by the compaction: the full log is kept, with a warning,
    and the broker does not try again (a snapshot of all the data) after every later command."""
    broker = start_broker(project)
    db1 = connect(project, 1)
    db1.xadd("events", {"kind": "started"})
    for n in range(34):  # 17 MiB: past the 16 MiB threshold
        db1.set("big", (b"%04d" % n) * (512 * 1024 // 4))
    refused = "cannot compact the append-only log: key b'events' in db 1 is a stream"
    wait_until(lambda: db1.ping() and refused in broker.output, 60, "the compaction to be tried")
    for n in range(50):  # fifty more batches, each asking whether to compact
        db1.set("small", n)
    wait_logged(project, b"small")
    assert db1.ping() and broker.output.count(refused) == 1
    assert persistence(project)["aof_rewrites"] == 0
    stop(broker)  # the exit compaction is refused too; the full log restores everything
    broker = start_broker(project)
    assert connect(project).xlen("events") == 1 and connect(project).get("small") == b"49"
    stop(broker)


def _spop(client: redis.Redis):
    client.sadd("s", *range(100))
    client.spop("s", 10)


def _xadd(client: redis.Redis):
    client.xadd("events", {"kind": "a"})
    client.xadd("events", {"kind": "b"})


def _hexpire(client: redis.Redis):
    client.hset("h", mapping={"a": "1", "b": "2"})
    client.hexpire("h", 500, "a")


CHOSEN = {"spop": (_spop, lambda client: sorted(client.smembers("s"))),
          "xadd *": (_xadd, lambda client: client.xrange("events")),
          "hexpire": (_hexpire, lambda client: client.hpexpiretime("h", "a", "b"))}


@pytest.mark.parametrize("case", list(CHOSEN))
def test_results_chosen_by_chance_or_the_clock_come_back_the_same(project, case):
    write, read = CHOSEN[case]
    broker = start_broker(project)
    write(connect(project))
    before = read(connect(project))
    connect(project).set("marker", "1")
    wait_logged(project, b"marker")
    kill9(broker)
    broker = start_broker(project)
    after = read(connect(project))
    stop(broker)
    assert after == before


def test_save_and_bgrewriteaof_rewrite_the_log_and_info_reports_it(project):
    broker = start_broker(project)
    info = persistence(project)
    assert info["aof_enabled"] == 1 and info["aof_rewrites"] == 0 and info["aof_loaded_commands"] == 0
    assert info["aof_set_aside"] == "" and info["loading"] == 0
    db1 = connect(project, 1)
    wrote_at = int(time.time())
    for _ in range(200):
        db1.incr("counter")
    db1.lpush("celery", kombu_message(1))
    connect(project, 0).set("db0-key", "zero")
    wait_logged(project, b"db0-key")
    # within a second (everysec) the file is synced; INFO's size is the file's
    synced = wait_until(lambda: (lambda i: i if i["aof_last_fsync"] >= wrote_at else None)(persistence(project)),
                        10, "an fsync of the log")
    assert synced["aof_current_size"] == log_of(project).stat().st_size > 0
    grown = synced["aof_current_size"]

    before_save = int(time.time())
    with db1.pipeline(transaction=False) as pipe:  # writes in SAVE's own batch, not yet handed to the writer
        for _ in range(50):
            pipe.incr("counter")
        assert pipe.save().execute()[-1] is True
    info = persistence(project)
    assert info["aof_rewrites"] == 1
    assert info["aof_base_size"] == info["aof_current_size"] == log_of(project).stat().st_size < grown
    assert before_save <= info["rdb_last_save_time"] <= time.time() + 1
    assert db1.lastsave().timestamp() == info["rdb_last_save_time"]
    assert db1.bgrewriteaof() is True
    assert persistence(project)["aof_rewrites"] == 2
    db1.hset("unacked", "tag-1", "after the rewrite")
    wait_logged(project, b"after the rewrite")
    assert persistence(project)["aof_current_size"] > persistence(project)["aof_base_size"]
    before = dump(project)
    assert before[0][(1, b"counter")] == (b"string", b"250")
    db1.close()
    kill9(broker)
    broker = start_broker(project)
    assert_same(before, dump(project))
    info = persistence(project)
    assert info["aof_loaded_commands"] > 0 and info["aof_rewrites"] == 0 and info["aof_set_aside"] == ""
    stop(broker)


# -- 5. --no-persist -------------------------------------------------------------------------------------


def test_no_persist_writes_nothing_and_forgets_at_restart(project):
    broker = start_broker(project, "--no-persist")
    assert "persistence off" in broker.output
    db1 = connect(project, 1)
    db1.lpush("celery", kombu_message(1))
    db1.set("marker-no-persist", "x", ex=1000)
    connect(project, 0).set("db0-key", "zero")
    info = persistence(project)
    assert info["aof_enabled"] == 0 and info["aof_current_size"] == 0
    with pytest.raises(redis.ResponseError, match="persistence is off"):
        db1.save()
    with pytest.raises(redis.ResponseError, match="persistence is off"):
        db1.bgrewriteaof()
    db1.close()
    stop(broker)
    assert not (project.state / "broker").exists()
    for path in project.state.rglob("*"):
        assert not path.is_file() or b"marker-no-persist" not in path.read_bytes(), path
    broker = start_broker(project, "--no-persist")
    assert connect(project, 1).dbsize() == 0 and connect(project, 0).dbsize() == 0
    stop(broker)
    broker = start_broker(project, env={"DIFY_LOCAL_BROKER_PERSIST": "false"})
    assert connect(project, 1).dbsize() == 0 and persistence(project)["aof_enabled"] == 0
    stop(broker)


# -- 6. no password off loopback ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, env, address", [
    (["--host", "0.0.0.0", "--no-password"], {}, "0.0.0.0"),
    (["--no-password"], {"REDIS_HOST": "0.0.0.0"}, "0.0.0.0"),
    (["--host", "::", "--no-password"], {}, "::"),
], ids=["--host", "REDIS_HOST", "ipv6"])
def test_no_password_is_refused_off_loopback(project, args, env, address):
    done = project.run("serve", "broker", *args, env=env)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    assert f"refusing to listen on {address} without a password" in output
    assert "REDIS_PASSWORD" in output and "127.0.0.1" in output  # what is allowed instead
    assert not port_open(project.broker_port)


@pytest.mark.parametrize("args, env", [(["--password", "difyai123456"], {}), ([], {"REDIS_PASSWORD": "difyai123456"})],
                         ids=["--password", "REDIS_PASSWORD"])
def test_the_published_password_is_refused_off_loopback(project, args, env):
    """difyai123456 is printed in Dify's documentation: off loopback it protects nothing, even
    when the user sets it (on loopback that is their choice)."""
    done = project.run("serve", "broker", "--host", "0.0.0.0", *args, env=env)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in output, output
    assert "refusing to listen on 0.0.0.0 with Dify's published example password" in output
    assert "REDIS_PASSWORD" in output and "127.0.0.1" in output
    assert not port_open(project.broker_port)


def test_a_password_of_ones_own_allows_a_non_loopback_address(project):
    secret = "a-secret-of-our-own"
    broker = start_broker(project, "--host", "0.0.0.0", "--password", secret)
    assert f"listening on redis://:****@0.0.0.0:{project.broker_port}" in broker.output
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=project.broker_port, retry=NO_RETRY).set("key", "value")
    client = redis.Redis(host="127.0.0.1", port=project.broker_port, password=secret, db=1)
    assert client.ping() and client.set("key", "value") and client.get("key") == b"value"
    stop(broker)


# -- the log's own guarantees, in-process (failures that real processes cannot provoke on cue) -------------


def test_two_broken_tails_in_the_same_second_are_both_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(aof_module.time, "strftime", lambda *args: "20260101-000000")
    log = tmp_path / "appendonly.aof"
    whole = b"*3\r\n$3\r\nset\r\n$1\r\nk\r\n$1\r\nv\r\n"
    kept = []
    for tail in (b"*3\r\n$3\r\nset", b"\x00first garbage", b"\x00second garbage"):
        log.write_bytes(whole + tail)
        report = AppendOnlyLog(tmp_path).load(lambda db, command: True)
        assert report.commands == 1 and report.set_aside is not None
        kept.append((report.set_aside, tail))
    assert len({path for path, _ in kept}) == 3
    for path, tail in kept:
        assert path.read_bytes() == tail


@pytest.fixture(params=["compiled", "python"])
def log_buffer_kind(request) -> bool:
    """The log's buffer of each read loop: the compiled one (runner/broker/_session.c) and aof.LogBuffer."""
    if request.param == "compiled":
        require_compiled_loop()
    return request.param == "compiled"


def test_a_failed_write_is_kept_and_written_once_the_disk_has_room(tmp_path, log_buffer_kind):
    """A full disk (here the file-size limit, RLIMIT_FSIZE: a partial write, then EFBIG): the writes
    the file refused stay in the buffer, first, with the log's error set, and go in once there is
    room again, in order, none twice."""
    log = AppendOnlyLog(tmp_path, compiled=log_buffer_kind)
    log.load(lambda db, command: True)
    log.open()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    big = b"v" * (1 << 20)  # (a limit far above anything else this process writes meanwhile)
    try:
        log.append(0, [b"set", b"k", big])
        assert log.write() and log.size == log.path.stat().st_size
        first = log.size
        resource.setrlimit(resource.RLIMIT_FSIZE, (first + 7, hard))  # room for 7 bytes more
        log.append(0, [b"rpush", b"q", b"m"])
        assert not log.write() and log.error.startswith("write: ")
        assert log.path.stat().st_size == log.size == first + 7  # 7 bytes in, the rest kept
        log.append(1, [b"set", b"k", b"w"])  # behind what is waiting
        assert not log.write()
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert log.write() and log.error == "" and log.buffer.pending == 0
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        log.close()
    assert log.path.read_bytes() == (b"*2\r\n$6\r\nselect\r\n$1\r\n0\r\n*3\r\n$3\r\nset\r\n$1\r\nk\r\n$1048576\r\n"
                                     + big + b"\r\n*3\r\n$5\r\nrpush\r\n$1\r\nq\r\n$1\r\nm\r\n"
                                     b"*2\r\n$6\r\nselect\r\n$1\r\n1\r\n*3\r\n$3\r\nset\r\n$1\r\nk\r\n$1\r\nw\r\n")


def test_a_compaction_the_disk_refuses_keeps_the_full_log_and_the_writes_in_flight(tmp_path, monkeypatch,
                                                                                  log_buffer_kind):
    log = AppendOnlyLog(tmp_path, compiled=log_buffer_kind)
    log.load(lambda db, command: True)
    log.open()
    try:
        log.append(0, [b"set", b"k", b"1"])
        log.write()
        log.append(0, [b"set", b"k", b"2"])  # in the buffer, not yet in the file
        real_open = os.open

        def refusing_open(path, *args, **kwargs):
            if str(path).endswith(".rewrite"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(aof_module.os, "open", refusing_open)
        assert log.rewrite([(0, [b"set", b"k", b"2"])]) is False
        monkeypatch.undo()
        log.write()
    finally:
        log.close()
    assert log.rewrites == 0 and not list(tmp_path.glob("*.rewrite"))
    assert log.path.read_bytes() == (b"*2\r\n$6\r\nselect\r\n$1\r\n0\r\n*3\r\n$3\r\nset\r\n$1\r\nk\r\n$1\r\n1\r\n"
                                     b"*3\r\n$3\r\nset\r\n$1\r\nk\r\n$1\r\n2\r\n")


def test_a_write_the_disk_refuses_is_not_acknowledged_until_it_is_written(project, read_loop):
    """A disk that refuses the log's writes (here the file-size limit, `ulimit -S -f`): the write the
    file refused gets no reply (an OK would promise what a crash then loses), further writes get
    Redis' MISCONF, reads still work, and both INFO and `broker info` say so. Once the disk has room
    again (the limit raised) the held reply comes, writes are accepted again, and kill -9 keeps
    every one that was acknowledged."""
    argv = ["bash", "-c", 'ulimit -S -f 64; exec "$@"', "bash", *dify_local(), "serve", "broker"]
    broker = project.start(argv=argv, env=read_loop)
    broker.wait_for_line(LISTENING, timeout=60)
    wait_until(lambda: port_open(project.broker_port), 30, "the embedded broker to listen")
    other = connect(project)
    writer = redis.Redis.from_url(project.broker_url)
    connection = writer.connection_pool.get_connection()
    value = b"v" * 1000
    sent = 0

    def answered_or_failing() -> bool:
        return connection.can_read(timeout=0) or persistence(project)["aof_last_write_status"] == "err"
    while True:
        connection.send_command("SET", f"key{sent}", value)
        sent += 1
        wait_until(answered_or_failing, 30, "the SET's reply, or the log's writes to fail")
        if not connection.can_read(timeout=0):
            break
        assert connection.read_response() == b"OK"  # (a MISCONF here: the failed write was acknowledged)
        assert sent < 200, "64 KiB should have been reached"
    assert sent > 10
    assert other.ping() and not connection.can_read(timeout=0)  # held back, not lost in transit
    assert persistence(project)["aof_last_write_status"] == "err"
    with pytest.raises(redis.ResponseError, match="MISCONF Errors writing to the AOF file"):
        other.lpush("queue", "message")
    with pytest.raises(redis.ResponseError, match="MISCONF"):  # a transaction with a write, too
        with other.pipeline(transaction=True) as pipe:
            pipe.get("key0").set("other", "x").execute()
    assert other.get("queue") is None and other.get("other") is None
    assert all(other.get(f"key{n}") == value for n in range(sent - 1))  # reads still work
    shown = project.run("broker", "info")
    assert "WRITES FAILING" in shown.stdout, shown.stdout + shown.stderr
    assert "writes refused (MISCONF)" in broker.output

    pid = int(other.info("server")["process_id"])
    hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, hard))  # room on the disk again
    wait_until(lambda: connection.can_read(timeout=0), 30, "the held reply once the log can grow again")
    assert connection.read_response() == b"OK"
    assert persistence(project)["aof_last_write_status"] == "ok"
    assert other.lpush("queue", "after") == 1
    writer.connection_pool.release(connection)
    writer.close()
    other.close()
    kill9(broker)
    broker = start_broker(project, env=read_loop)
    with connect(project) as client:
        assert all(client.get(f"key{n}") == value for n in range(sent)) and client.lrange("queue", 0, -1) == [b"after"]
    stop(broker)
