"""The API's HTTP server: waitress, which reads every request asynchronously and hands only complete
ones to its threads, so a slow or stalled client holds a socket, never a thread.

What waitress leaves open, and what is added here:

- A request must arrive whole within REQUEST_TIMEOUT of the connection's accept (or of the previous
  answer on a kept-alive connection), plus a second for every MIN_RATE bytes of it received, so
  that a large upload over a slow link still gets through. Waitress' own channel_timeout counts
  silence only: a client sending a byte every few seconds (slowloris) would keep its connection
  for ever. A response nobody reads is dropped after OUTPUT_TIMEOUT without progress.
- Full (CONNECTION_LIMIT open connections), waitress stops accepting until one closes; here the
  connection that has waited longest for its request is closed instead, so a new client still
  gets in while others stall.
- Stopping: accept no more (under `up` the listening socket stays open for the next API process,
  runner.supervisor.listeners), answer every connection accepted and every request received, up
  to STOP_WAIT, and close kept-alive connections that wait for nothing.
- The answers waitress gives itself (a malformed request, headers or a body over the limits) are
  JSON, as the app's are.
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import threading
import time

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher

from runner.supervisor.listeners import BACKLOG

log = logging.getLogger("dify_local.api")

REQUEST_TIMEOUT = 10.0  # seconds for a request to arrive whole (headers and body) ...
MIN_RATE = 16 * 1024  # ... plus one second per this many bytes received (an upload on a slow link)
OUTPUT_TIMEOUT = 30.0  # seconds a response may wait for its client to read any of it
STOP_WAIT = 8.0  # seconds a stopping API waits for what it accepted (below up's 10 s grace)
CONNECTION_LIMIT = 1000  # open connections; each holds a descriptor (two while its body is spooled to disk)
RESERVED_FILES = 200  # descriptors kept for everything else (SQLite, the broker, imports)
MAX_HEADER_BYTES = 64 * 1024  # a request's headers, all together (werkzeug's development server: 64 KiB a line)
DISCARD_AT_CLOSE = 1024 * 1024  # bytes of unread input read away when closing, at most
LOOP_TICK = 1.0  # seconds the event loop may sleep: how often deadlines are checked


class JsonErrorTask(ErrorTask):
    """Waitress' own error answers (400, 413, 431 …) as the app's: {"error": message}."""

    def execute(self):
        error = self.request.error
        body = json.dumps({"error": f"{error.reason}: {error.body}"}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class TimedChannel(HTTPChannel):
    """A connection that knows since when it waits for its next request, and how much of it came."""

    error_task_class = JsonErrorTask

    def __init__(self, server, sock, addr, adj, map=None):
        super().__init__(server, sock, addr, adj, map)
        self.waiting_since = time.monotonic()  # for the request being received
        self.arrived = 0  # bytes of it so far
        self.answered = 0  # requests answered on this connection
        self.serving = 0  # requests being answered by the threads now
        self.serving_lock = threading.Lock()

    def received(self, data):
        self.arrived += len(data)
        return super().received(data)

    def service(self):
        with self.serving_lock:
            self.serving += 1
        try:
            super().service()
        finally:
            with self.serving_lock:
                # the next request's clock starts before `serving` drops: the loop reads it unlocked
                self.waiting_since, self.arrived = time.monotonic(), 0
                self.answered += 1
                self.serving -= 1

    def handle_close(self):
        # Unread input at close makes the kernel send a reset, and the client loses the answer it
        # was sent (a 431 for headers too large, the rest of them unread): read what has arrived.
        discarded = 0
        try:
            while discarded < DISCARD_AT_CLOSE:
                data = self.socket.recv(65536, socket.MSG_DONTWAIT)
                if not data:
                    break
                discarded += len(data)
        except (OSError, AttributeError):  # nothing more to read; or closed already
            pass
        super().handle_close()

    @property
    def busy(self) -> bool:
        """A request is queued or being answered, or its answer is still being sent."""
        return bool(self.serving or self.requests or self.total_outbufs_len)

    def overdue(self, now: float) -> bool:
        if self.serving or self.requests:
            return False  # the app's time, not the client's
        if self.total_outbufs_len:
            return time.time() - self.last_activity > OUTPUT_TIMEOUT  # waitress' clock for the last byte sent
        return now - self.waiting_since > REQUEST_TIMEOUT + self.arrived / MIN_RATE

    @property
    def unanswered(self) -> bool:
        """What a stopping API must finish: a request (partly) received or being answered, an answer
        not sent yet, or a connection accepted whose first request has not come yet. A kept-alive
        connection waiting for nothing is not: nobody waits on it."""
        return self.busy or self.arrived > 0 or self.answered == 0


class ApiServer(TcpWSGIServer):
    channel_class = TimedChannel

    def maintenance(self, now):
        """Every LOOP_TICK (instead of waitress' silence timeout): close what is overdue."""
        clock = time.monotonic()
        for channel in list(self.active_channels.values()):
            if not channel.will_close and channel.overdue(clock):
                log.debug("closing the connection from %s: no complete request or no reader in time",
                          channel.addr)
                channel.will_close = True

    def readable(self):
        if self.accepting and len(self._map) >= self.adj.connection_limit:
            self._make_room()
        return super().readable()

    def _make_room(self) -> None:
        """Close the connection that has waited longest for its request (not one being answered)."""
        waiting = [channel for channel in self.active_channels.values() if not channel.busy and not channel.will_close]
        if waiting:
            oldest = min(waiting, key=lambda channel: channel.waiting_since)
            log.debug("%d connections open: closing the one from %s, waiting longest for its request",
                      len(self.active_channels), oldest.addr)
            oldest.will_close = True

    # -- running and stopping ------------------------------------------------------------------------

    def serve_until(self, stop: threading.Event) -> None:
        while not stop.is_set():
            wasyncore.loop(timeout=LOOP_TICK, use_poll=True, map=self._map, count=1)

    def drain(self, wait: float = STOP_WAIT) -> bool:
        """Accept no more; answer what was accepted, up to `wait` seconds. True if all was answered."""
        self.accepting = False
        deadline = time.monotonic() + wait
        while True:
            channels = list(self.active_channels.values())
            for channel in channels:
                if not channel.unanswered and not channel.will_close:
                    channel.will_close = True
            if not any(channel.unanswered for channel in channels):
                return True
            if time.monotonic() > deadline:
                return False
            wasyncore.loop(timeout=0.05, use_poll=True, map=self._map, count=1)

    def close_all(self) -> None:
        self.task_dispatcher.shutdown(timeout=1)
        wasyncore.close_all(self._map)


def connection_limit() -> int:
    """CONNECTION_LIMIT, or what the descriptors this process may open allow (the soft limit is
    raised towards the hard one first: a desktop's soft limit is often 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * CONNECTION_LIMIT + RESERVED_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return CONNECTION_LIMIT
    return max(16, min(CONNECTION_LIMIT, (soft - RESERVED_FILES) // 2))


def make_server(app, sock: socket.socket, *, threads: int, max_body: int) -> ApiServer:
    """The server on a listening socket, `threads` requests answered at once (SERVER_WORKER_CONNECTIONS),
    bodies up to `max_body` bytes (the largest any route takes; the routes keep their own limits)."""
    adj = Adjustments(sockets=[sock], threads=threads, connection_limit=connection_limit(), backlog=BACKLOG,
                      cleanup_interval=LOOP_TICK, channel_timeout=OUTPUT_TIMEOUT,
                      max_request_header_size=MAX_HEADER_BYTES, max_request_body_size=max_body + 1,
                      asyncore_use_poll=True, log_socket_errors=False, ident="dify-local",
                      # the Host of a request that names none (HTTP/1.0), as werkzeug's was: the address
                      server_name=sock.getsockname()[0])
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(threads)
    return ApiServer(app, map={}, _sock=sock, dispatcher=dispatcher, adj=adj, bind_socket=False,
                     sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()))
