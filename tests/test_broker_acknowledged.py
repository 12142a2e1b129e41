"""Acknowledged means written (issue 16, point 3): a write's reply goes out only once the write is
in the append-only log file (write(2); the fsync follows within a second), so kill -9 of the
broker loses nothing it acknowledged, on both read loops, whatever way the write came: one by
one, pipelined, in MULTI/EXEC, in a Lua script, around compactions of the log, or as the pop a
parked BRPOP got when another client pushed. redis-server (appendonly, appendfsync everysec) runs
the same, for the record.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable

import pytest
import redis

from tests.conftest import REAL_PASSWORD, _redis_binary, _start_redis
from tests.helpers import free_port, port_open, wait_until

LISTENING = r"embedded broker \(fakeredis [\d.]+, \w+ read loop\) listening on"
ACKED = 3000  # writes acknowledged before the kill
ROUNDS = 300  # parked BRPOPs served by a push


# -- the servers: started, killed with -9 and started again on the same data -------------------------


class Embedded:
    def __init__(self, project, read_loop: dict[str, str]):
        self.project, self.env, self.proc = project, read_loop, None

    def start(self) -> redis.Redis:
        self.proc = self.project.start("serve", "broker", env=self.env)
        self.proc.wait_for_line(LISTENING, timeout=60)
        wait_until(lambda: port_open(self.project.broker_port), 30, "the embedded broker to listen")
        return redis.Redis.from_url(self.project.broker_url, socket_timeout=60)

    def kill(self) -> None:
        self.proc.signal(signal.SIGKILL)
        assert self.proc.wait(30) == -signal.SIGKILL

    def stop(self) -> None:
        self.proc.signal(signal.SIGTERM)
        assert self.proc.wait(60) == 0, self.proc.output


class RealRedis:
    """redis-server with its append-only log fsynced every second, as the embedded broker's."""

    def __init__(self, folder: Path):
        folder.mkdir()
        self.folder, self.port, self.proc = folder, free_port(), None
        self.argv = [_redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", REAL_PASSWORD,
                     "--dir", str(folder), "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]

    def start(self) -> redis.Redis:
        self.proc = _start_redis(self.argv, self.folder, self.port, "redis-server (appendonly)")
        client = redis.Redis(port=self.port, password=REAL_PASSWORD, db=1, socket_timeout=60)

        def loaded() -> bool:
            try:
                return client.ping()
            except redis.BusyLoadingError:
                return False
        wait_until(loaded, 30, "redis-server to load its log")
        return client

    def kill(self) -> None:
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        self.proc.cleanup()


# -- the ways a write comes: each makes its writes, acknowledged one by one, and returns what a ------
# -- restart must find, and how to read it ---------------------------------------------------------

Expected = dict[str, list[bytes]]
Reader = Callable[[redis.Redis], Expected]
NUMBERS = [b"%d" % n for n in range(ACKED)]


def queue(client: redis.Redis) -> Expected:
    return {"queue": client.lrange("queue", 0, -1)[::-1]}  # LPUSH: the oldest is at the tail


def one_by_one(client: redis.Redis) -> tuple[Expected, Reader]:
    for n in range(ACKED):
        client.lpush("queue", n)
    return {"queue": NUMBERS}, queue


def pipelined(client: redis.Redis) -> tuple[Expected, Reader]:
    for start in range(0, ACKED, 100):
        with client.pipeline(transaction=False) as pipe:
            for n in range(start, start + 100):
                pipe.lpush("queue", n)
            pipe.execute()
    return {"queue": NUMBERS}, queue


def in_transactions(client: redis.Redis) -> tuple[Expected, Reader]:
    for start in range(0, ACKED, 10):
        with client.pipeline(transaction=True) as pipe:
            for n in range(start, start + 10):
                pipe.lpush("queue", n)
            pipe.execute()
    return {"queue": NUMBERS}, queue


def by_script(client: redis.Redis) -> tuple[Expected, Reader]:
    """Two writes per script: logged together, in MULTI/EXEC."""
    push = client.register_script("redis.call('lpush', KEYS[1], ARGV[1]) return redis.call('rpush', KEYS[2], ARGV[1])")
    for n in range(ACKED):
        assert push(keys=["queue", "also"], args=[n]) == n + 1
    return {"queue": NUMBERS, "also": NUMBERS}, lambda c: {**queue(c), "also": c.lrange("also", 0, -1)}


def around_compactions(client: redis.Redis) -> tuple[Expected, Reader]:
    """Pipelines with a BGREWRITEAOF in the middle: the writes before it are in the compacted log
    (its snapshot), those after it go to the new file, none lost, none twice, in order."""
    for start in range(0, ACKED, 500):
        with client.pipeline(transaction=False) as pipe:
            for n in range(start, start + 500):
                pipe.lpush("queue", n)
                if n % 500 == 250:
                    pipe.bgrewriteaof()
            replies = pipe.execute(raise_on_error=False)  # (redis-server: "already in progress", at times)
        assert [reply for reply in replies if type(reply) is int] == list(range(start + 1, start + 501))
    return {"queue": NUMBERS}, queue


def parked_pops(client: redis.Redis) -> tuple[Expected, Reader]:
    """A client parked on BRPOP, woken each round by another client's transaction that pushes the
    value it pops and one that stays: the pop's effect and the push's must both be written before
    either client hears back (the pop undone would bring its value back to `wake`)."""
    popper = redis.Redis(connection_pool=redis.ConnectionPool(**client.connection_pool.connection_kwargs))
    connection = popper.connection_pool.get_connection()
    popped = []
    try:
        for n in range(ROUNDS):
            connection.send_command("BRPOP", "wake", 0)
            wait_until(lambda: client.info("clients")["blocked_clients"] == 1, 30, "the BRPOP to park",
                       interval=0.001)
            with client.pipeline(transaction=True) as pipe:
                pipe.lpush("wake", f"popped-{n}").lpush("kept", f"kept-{n}").execute()
            popped.append(connection.read_response())
    finally:
        popper.connection_pool.release(connection)
        popper.close()
    assert popped == [[b"wake", b"popped-%d" % n] for n in range(ROUNDS)]
    return ({"wake": [], "kept": [b"kept-%d" % n for n in range(ROUNDS)]},
            lambda c: {"wake": c.lrange("wake", 0, -1), "kept": c.lrange("kept", 0, -1)[::-1]})


WAYS = {"one by one": one_by_one, "pipelined": pipelined, "MULTI/EXEC": in_transactions, "Lua script": by_script,
        "around compactions": around_compactions, "parked BRPOP": parked_pops}


def acknowledged_then_killed(server, way: str) -> tuple[Expected, Expected]:
    """The writes, kill -9 as soon as the last reply came, a restart: what was acknowledged, and
    what is there."""
    client = server.start()
    try:
        expected, read = WAYS[way](client)
    finally:
        client.close()
    server.kill()
    client = server.start()
    try:
        return expected, read(client)
    finally:
        client.close()
        server.stop()


def counts(expected: Expected, found: Expected) -> str:
    return ", ".join(f"{name} {len(found[name])} (acknowledged {len(values)})" for name, values in expected.items())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("way", list(WAYS))
def test_kill_9_right_after_the_replies_loses_nothing_acknowledged(project, read_loop, tmp_path, way):
    expected, found = acknowledged_then_killed(Embedded(project, read_loop), way)
    # for the record: redis-server, appendfsync everysec, the same writes and the same kill
    anchor = acknowledged_then_killed(RealRedis(tmp_path / "redis"), way)
    print(f"after kill -9, {way}: embedded broker {counts(expected, found)}; "
          f"redis-server (everysec) {counts(*anchor)}")
    assert found == expected, counts(expected, found)
