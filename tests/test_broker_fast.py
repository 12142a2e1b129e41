"""The embedded broker's fast path (Celery's hot commands run on fakeredis' data directly) answers
exactly as redis-server does: random command sequences, reply by reply, against both, through
each of the broker's read loops (compiled and Python)."""

from __future__ import annotations

import random
import socket
import time

import pytest
import redis

from tests.helpers import wait_until

KEYS = [b"k0", b"k1", b"k2", b"k3"]


def command(rng: random.Random) -> list[bytes]:
    key = rng.choice(KEYS)
    value = rng.choice([b"v", b"longer value", b"", b"\x00binary\r\n"])
    field = rng.choice([b"f1", b"f2", b"f3"])
    score = rng.choice([b"1", b"2.5", b"-3", b"0", b"10", b"+4.", b".5", b"1700000000.123",
                        # forms Redis and Python read differently, or only one of them reads
                        b"1e3", b"1e400", b"1" + b"0" * 400, b"0x10", b" 1", b"1_0", b"inf", b"-inf", b"nan", b"x"])
    member = rng.choice([b"m1", b"m2", b"m3"])
    return rng.choice([
        [b"GET", key], [b"SET", key, value], [b"SET", key, value, b"EX", b"100"], [b"SET", key, value, b"PX", b"5000"],
        [b"SETEX", key, b"100", value], [b"DEL", key], [b"DEL", key, rng.choice(KEYS)],
        [b"LPUSH", key, value], [b"LPUSH", key, value, b"second"], [b"RPUSH", key, value], [b"LLEN", key],
        [b"LPOP", key], [b"RPOP", key], [b"BRPOP", key, rng.choice(KEYS), b"0.01"], [b"BLPOP", key, b"0.01"],
        [b"HSET", key, field, value], [b"HSET", key, field, value, b"f9", b"x"], [b"HDEL", key, field],
        [b"HDEL", key, field, b"f9"], [b"HGET", key, field],
        [b"ZADD", key, score, member], [b"ZADD", key, score, member, b"5", b"m9"], [b"ZREM", key, member],
        [b"ZREM", key, member, b"m9"], [b"PUBLISH", b"channel", value], [b"PING"],
        # a few that leave the fast path, so both paths mix on the same data
        [b"TYPE", key], [b"LRANGE", key, b"0", b"-1"], [b"ZRANGE", key, b"0", b"-1", b"WITHSCORES"],
        [b"HGETALL", key], [b"EXISTS", key],
    ])


def normalise(reply):
    if isinstance(reply, redis.ResponseError):
        return ("error", str(reply).split(" ")[0])  # the error code: WRONGTYPE, ERR …
    if isinstance(reply, list):
        return [normalise(item) for item in reply]
    if isinstance(reply, dict):
        return {normalise(k): normalise(v) for k, v in reply.items()}
    if isinstance(reply, float):
        return round(reply, 6)
    return reply


def run(client: redis.Redis, commands: list[list[bytes]]) -> list:
    replies = []
    for entry in commands:
        if entry == [b"MULTI"]:
            continue
        try:
            replies.append(normalise(client.execute_command(*entry)))
        except redis.ResponseError as error:
            replies.append(normalise(error))
    return replies


@pytest.fixture
def brokers(project, redis_server, read_loop):
    project.serve_broker(env=read_loop)
    embedded = redis.Redis(port=project.broker_port, password=project.broker_password, protocol=3)
    real = redis.Redis.from_url(redis_server, protocol=3)
    yield embedded, real
    embedded.close()
    real.close()


@pytest.mark.parametrize("seed", range(6))
def test_random_commands_answer_as_redis_does(brokers, seed):
    embedded, real = brokers
    rng = random.Random(seed)
    sequence = [command(rng) for _ in range(400)]
    for client in (embedded, real):
        client.flushall()
    assert run(embedded, sequence) == run(real, sequence)
    for key in KEYS:  # and the data ends up the same
        kinds = [client.type(key) for client in (embedded, real)]
        assert kinds[0] == kinds[1], key


@pytest.mark.parametrize("seed", range(4))
def test_transactions_answer_as_redis_does(brokers, seed):
    embedded, real = brokers
    results = []
    for client in (embedded, real):
        client.flushall()
        rng_copy = random.Random(100 + seed)
        replies = []
        for _ in range(60):
            with client.pipeline(transaction=True) as pipe:
                for entry in [command(rng_copy) for _ in range(rng_copy.randint(1, 5))]:
                    pipe.execute_command(*entry)
                replies.append(normalise(pipe.execute(raise_on_error=False)))
        results.append(replies)
    assert results[0] == results[1]


def raw_exchange(port: int, password: bytes | None, payload: bytes, expected_length: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.settimeout(5)
        hello = b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n" if password is None else (
            b"*5\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$4\r\nAUTH\r\n$7\r\ndefault\r\n$%d\r\n%s\r\n" % (len(password), password))
        raw.sendall(hello)
        time.sleep(0.2)
        raw.recv(65536)  # the HELLO map
        raw.sendall(payload)
        data = b""
        deadline = time.monotonic() + 5
        while len(data) < expected_length and time.monotonic() < deadline:
            data += raw.recv(65536)
        return data


def test_pub_sub_messages_are_resp3_pushes_as_in_redis(project, redis_server, read_loop):
    project.serve_broker(env=read_loop)
    real_port = int(redis_server.rsplit(":", 1)[1])
    subscribe = b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nch\r\n"
    expected = b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
    assert raw_exchange(real_port, b"realredispw", subscribe, len(expected)) == expected
    assert raw_exchange(project.broker_port, project.broker_password.encode(), subscribe, len(expected)) == expected
    client = redis.Redis(port=project.broker_port, password=project.broker_password, protocol=3)
    pubsub = client.pubsub()
    pubsub.subscribe("news")
    wait_until(lambda: pubsub.get_message(timeout=0.1), 5, "the subscribe confirmation")
    assert client.publish("news", "hello") == 1
    message = wait_until(lambda: pubsub.get_message(timeout=0.1), 5, "the message")
    assert message["type"] == "message" and message["data"] == b"hello"


def test_fast_path_keeps_expiry_and_watch(brokers):
    embedded, real = brokers
    for client in (embedded, real):
        client.flushall()
        client.set("ttl", "v", px=300)
        assert 0 < client.pttl("ttl") <= 300
        wait_until(lambda c=client: c.get("ttl") is None, 5, "the key to expire")
        with client.pipeline() as pipe:  # WATCH, then a fast-path write from another client
            pipe.watch("watched")
            other = redis.Redis(connection_pool=client.connection_pool)
            other.set("watched", "changed")
            pipe.multi()
            pipe.set("watched", "mine")
            with pytest.raises(redis.WatchError):
                pipe.execute()
        assert client.get("watched") == b"changed"


PATTERNS = [b"news.*", b"h?llo", b"h*llo", b"h[ae]llo", b"h[^e]llo", b"h[a-b]llo", b"h[b-a]llo", b"a\\*b", b"*",
            b"[", b"x[", b"\\", b"h\\", b"*o", b"**", b"h[\\]]llo", b"[!-~]*", b"a*b*c"]
CHANNELS = [b"news.sport", b"news", b"hello", b"hallo", b"hbllo", b"hxllo", b"hllo", b"a*b", b"axb", b"x[", b"[",
            b"\\", b"h\\", b"h]llo", b"abc", b"aXbYc", b"", b"o"]


def test_pattern_subscribers_get_what_redis_sends_them(brokers):
    """PUBLISH to pattern subscribers (Celery's workers PSUBSCRIBE to their pidbox and events):
    Redis' glob rules, each match pushed, the count of receivers as Redis counts them."""
    results = []
    for client in brokers:
        pubsub = client.pubsub()
        pubsub.psubscribe(*PATTERNS)
        wait_until(lambda p=pubsub: len([m for m in iter(lambda: p.get_message(timeout=0.05), None)]) == 0, 5,
                   "the subscriptions to settle")
        counts = [client.publish(channel, b"m-" + channel) for channel in CHANNELS]
        received = []
        deadline = time.monotonic() + 5
        while len(received) < sum(counts) and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
            if message and message["type"] == "pmessage":
                received.append((message["pattern"], message["channel"], message["data"]))
        pubsub.close()
        results.append((counts, sorted(received)))
    assert results[0] == results[1]
    assert sum(results[0][0]) > len(CHANNELS)  # most channels matched something
