"""Each worker node's heartbeat: a key on the broker, rewritten every few seconds with a TTL.

`doctor` reads it to tell a worker that is alive from one that stopped or hangs, and since when.
Celery's own heartbeats are events, which our workers run without: turning them on (-E) would
publish an event for every task, and reading one means listening on the event exchange for a
whole heartbeat period. A key is read with one round trip and still says when a node last beat
after it died. It is written from the consumer's timer, as Celery's own Heart is: the event loop
that also answers pings, so a worker whose loop is stuck stops beating.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from celery import bootsteps

from runner.broker_config import broker_connection, worker_heartbeat_key

log = logging.getLogger("dify_local.worker")

INTERVAL = 2.0  # seconds between beats (Celery's own heartbeat period)
TTL = 60  # seconds: a node that stopped beating is still seen, as stale, for this long
TIMEOUT = 1.0  # seconds a beat may wait on the broker: it runs in the event loop

# Delete the key only if it still holds this process's last beat: during a reload the next
# worker, with the same node name, beats before this one stops.
_FORGET = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class WorkerHeartbeat(bootsteps.StartStopStep):
    """A consumer bootstep: beats once the node consumes (after Tasks), stops with the consumer."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c, **kwargs):
        super().__init__(c, **kwargs)
        self.tref = None
        self.connection = None
        self.last: str | None = None

    def start(self, c) -> None:
        self.key = worker_heartbeat_key(c.hostname)
        self.beat(c)
        self.tref = c.timer.call_repeatedly(INTERVAL, self.beat, (c,))

    def beat(self, c) -> None:
        value = json.dumps({"node": c.hostname, "pid": os.getpid(), "host": socket.gethostname(),
                            "at": time.time(), "interval": INTERVAL})
        try:
            self._client(c).set(self.key, value, ex=TTL)
            self.last = value
        except Exception as error:  # the consumer reconnects on its own; beat again when it does
            log.debug("could not write the worker's heartbeat: %s", error)
            self._close()

    def stop(self, c) -> None:
        if self.tref is not None:
            c.timer.cancel(self.tref)
            self.tref = None
        if self.last is not None and self.connection is not None:  # no connection: the last beat failed
            try:
                self._client(c).eval(_FORGET, 1, self.key, self.last)
            except Exception:  # broker gone: the key expires on its own
                pass
        self.last = None
        self._close()

    shutdown = stop

    def _client(self, c):
        if self.connection is None:
            self.connection = broker_connection(c.app.dify.settings, timeout=TIMEOUT)
        return self.connection.default_channel.client

    def _close(self) -> None:
        if self.connection is not None:
            try:
                self.connection.release()
            except Exception:
                pass
            self.connection = None
