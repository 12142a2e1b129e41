"""The embedded broker holds each Celery task message a BRPOP takes (runner/broker/delivery_hold.py).

kombu pops a message and writes it into its `unacked` hash only in a second round trip: a worker
killed in between, or a broker killed after the pop, lost the message. Here a client pops the way a
worker does and then dies before that second step: the message is held all the same, survives a
kill -9 of the broker, is put back in its queue by kombu's own sweep once the visibility timeout
has passed, and kombu's ack still deletes the entry. Replies that consumers take without acks
(`celery inspect`) are not held. On both read loops, for pops answered at once and for parked ones.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis
from celery import Celery
from kombu import Connection, Exchange, Producer, Queue

from runner.broker.delivery_hold import UNACKED_INDEX_KEY, UNACKED_KEY, held_entry, task_delivery
from tests.helpers import wait_until
from tests.test_broker_acknowledged import Embedded

QUEUE = "dataset"


def send_task(url: str, name: str = "demo.add") -> str:
    app = Celery("hold", broker=url, set_as_current=False)
    try:
        return app.send_task(name, args=(1, 2), queue=QUEUE).id
    finally:
        app.close()


def held(client: redis.Redis) -> dict[str, tuple[dict, str, str, float]]:
    """The unacked hash by task id: (message, exchange, routing key, the index's score)."""
    scores = dict(client.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True))
    found = {}
    for tag, value in client.hgetall(UNACKED_KEY).items():
        message, exchange, routing_key = json.loads(value)
        found[message["headers"]["id"]] = (message, exchange, routing_key, scores.get(tag))
    return found


def pop_and_die(url: str, timeout: int = 5) -> bytes:
    """BRPOP as a worker does, then the connection closed without the HSET kombu would send."""
    client = redis.Redis.from_url(url, socket_timeout=30)
    try:
        popped = client.brpop([QUEUE], timeout=timeout)
        assert popped is not None, "nothing popped"
        return popped[1]
    finally:
        client.close()


def test_a_task_popped_by_a_worker_that_dies_is_held_survives_kill_9_and_comes_back(project, read_loop):
    broker = Embedded(project, read_loop)
    client = broker.start()
    url = project.broker_url

    # answered at once: the message was in the queue
    first = send_task(url)
    before = time.time()
    popped = pop_and_die(url)
    assert json.loads(popped)["headers"]["id"] == first

    # parked: the pop waits, then a push serves it
    parked: list[bytes] = []
    waiter = threading.Thread(target=lambda: parked.append(pop_and_die(url, timeout=20)))
    waiter.start()
    wait_until(lambda: client.info("clients")["blocked_clients"] == 1, 30, "the BRPOP to be parked")
    second = send_task(url)
    waiter.join(30)
    assert parked and json.loads(parked[0])["headers"]["id"] == second

    entries = held(client)
    assert set(entries) == {first, second}, entries
    message, exchange, routing_key, score = entries[first]
    assert message == json.loads(popped), "held as kombu holds it: the message as it was queued"
    info = message["properties"]["delivery_info"]
    assert (exchange, routing_key) == (info["exchange"], info["routing_key"]) == ("", QUEUE)
    assert score is not None and before - 1 <= score <= time.time() + 1
    assert client.llen(QUEUE) == 0

    broker.kill()  # the hold was logged before the pop was answered
    client = broker.start()
    assert set(held(client)) == {first, second}

    # kombu's own sweep (a worker's, every few seconds) puts back what was held past the timeout
    with Connection(url, transport_options={"visibility_timeout": 1}) as connection:
        wait_until(lambda: (connection.default_channel.qos.restore_visible(num=10), client.llen(QUEUE))[1] == 2,
                   30, "kombu to restore both held messages")
        restored = {json.loads(raw)["headers"]["id"]: json.loads(raw) for raw in client.lrange(QUEUE, 0, -1)}
        assert set(restored) == {first, second}
        assert all(m["properties"]["delivery_info"]["redelivered"] for m in restored.values())
        assert client.hlen(UNACKED_KEY) == 0

        # a consumer that lives: kombu's QoS.append rewrites the entry, its ack deletes it
        got = []
        queue = Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE)
        with connection.Consumer(queue, callbacks=[lambda body, m: got.append(m)], accept=["json"]):
            wait_until(lambda: (connection.drain_events(timeout=1) if not got else None) or got, 30,
                       "a message to be delivered", interval=0)
            assert client.hlen(UNACKED_KEY) >= 1
            for m in got:
                m.ack()
            delivered = {m.headers["id"] for m in got}
            assert not set(held(client)) & delivered, "an acknowledged message stays held"
    broker.stop()


def test_messages_taken_without_acks_are_not_held(project, read_loop):
    """A `celery inspect` reply (headers without a task) or any other value: popped, and gone."""
    broker = Embedded(project, read_loop)
    client = broker.start()
    with Connection(project.broker_url) as connection:
        Producer(connection.default_channel).publish({"ok": "pong"}, exchange="", routing_key=QUEUE,
                                                     headers={"ticket": "t-1"}, serializer="json")
    client.lpush(QUEUE, b"plain", b'{"properties": {"delivery_tag": "x"}}', b"{" * 100_000)
    for _ in range(4):
        assert pop_and_die(project.broker_url) is not None
    assert client.exists(UNACKED_KEY, UNACKED_INDEX_KEY) == 0
    broker.stop()


@pytest.mark.parametrize("message", [
    b"", b"[]", b"{}", b"not json", b"{" * 50_000,
    json.dumps({"properties": {"delivery_tag": "t", "delivery_info": {"exchange": "", "routing_key": "q"}},
                "headers": {"ticket": "x"}}).encode(),  # a pidbox reply
    json.dumps({"properties": {"delivery_tag": 5, "delivery_info": {"exchange": "", "routing_key": "q"}},
                "headers": {"task": "a", "id": "b"}}).encode(),  # a tag that is no string
    json.dumps({"properties": [], "headers": {"task": "a", "id": "b"}}).encode(),
])
def test_only_task_messages_are_recognised(message):
    assert task_delivery(message) is None


def test_a_task_message_is_held_as_kombu_writes_it():
    info = {"exchange": "ex", "routing_key": "rk"}
    message = json.dumps({"body": "W10=", "headers": {"task": "demo.add", "id": "i-1"},
                          "properties": {"delivery_tag": "tag-1", "delivery_info": info}}).encode()
    assert task_delivery(message) == (b"tag-1", "ex", "rk")
    assert json.loads(held_entry(message, "ex", "rk")) == [json.loads(message), "ex", "rk"]
