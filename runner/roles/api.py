"""MODE=api: the Flask API (migrations first when MIGRATION_ENABLED), served by werkzeug."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from typing import TYPE_CHECKING

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from runner.api import create_api
from runner.process_env import LISTEN_FD
from runner.reload import child
from runner.roles.common import RoleStartError, celery_for_role, start_role, stop_on_signals
from runner.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

    from runner.store.task_runs import TaskRunRecorder

log = logging.getLogger("dify_local.api")


class ApiStartError(RoleStartError):
    pass


STOP_WAIT = 8.0  # seconds a stopping API waits for the requests it took (below up's 10 s grace)


class Unanswered:
    """Connections accepted whose first request is not answered yet, plus requests being answered:
    what a stopping API must finish, or their clients see the connection closed without an answer
    (a reload's old API). Idle keep-alive connections are not waited for: nobody is waiting on them."""

    def __init__(self):
        self._count = 0
        self._changed = threading.Condition()

    def add(self) -> None:
        with self._changed:
            self._count += 1

    def done(self) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify_all()

    def wait_until_none(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._count <= 0, timeout)


class CountingHandler(WSGIRequestHandler):
    """Counts each request it answers; a connection's first is counted from its accept (by the server)."""

    server: "LimitedThreadedServer"
    first_pending = True

    def run_wsgi(self) -> None:
        if not self.first_pending:
            self.server.unanswered.add()
        self.first_pending = False
        try:
            super().run_wsgi()
        finally:
            self.server.unanswered.done()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self.first_pending:  # closed without a request
                self.first_pending = False
                self.server.unanswered.done()


class LimitedThreadedServer(ThreadedWSGIServer):
    """A thread per connection, at most SERVER_WORKER_CONNECTIONS requests served at once."""

    def __init__(self, *args, connections: int, **kwargs):
        super().__init__(*args, handler=CountingHandler, **kwargs)
        self.slots = threading.BoundedSemaphore(connections)
        self.daemon_threads = True
        self.unanswered = Unanswered()

    def process_request(self, request, client_address):
        # counted here, at the accept, so a stop right after it still waits for this connection
        self.unanswered.add()
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        with self.slots:
            super().process_request_thread(request, client_address)


def api_celery(settings: Settings) -> tuple[Celery, TaskRunRecorder]:
    """The API's Celery app: it polls results and sends tasks by name, without importing a task
    module (their signatures come from their source, runner.task_catalogue)."""
    return celery_for_role(settings, poll_results=True, register_tasks=False)


def held_socket(host: str, port: int) -> int | None:
    """The listening socket `up` holds for the API across its restarts (runner.supervisor.listeners),
    if it listens where this API is to listen; None to bind one of our own."""
    fd = os.environ.pop(LISTEN_FD, "")
    if not fd.isdigit():
        return None
    try:
        with socket.socket(fileno=os.dup(int(fd))) as held:
            address = held.getsockname()
    except OSError:
        return None
    try:
        wanted = {info[4][:2] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        return None
    return int(fd) if address[:2] in wanted else None


def serve_api(settings: Settings) -> None:
    start_role(settings, "api")
    celery, recorder = api_celery(settings)
    app = create_api(settings, celery)
    host, port = settings.DIFY_BIND_ADDRESS, settings.DIFY_PORT
    child.loaded()  # taking over, this waits until the API it replaces has let go of the port
    try:
        server = LimitedThreadedServer(host, port, app, connections=settings.SERVER_WORKER_CONNECTIONS,
                                       fd=held_socket(host, port))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ApiStartError(f"port {port} on {host} is in use: set DIFY_PORT or use --port") from None
        raise ApiStartError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    stop_on_signals(server.shutdown)
    log.info("API listening on %s", settings.api_url)
    child.serving()
    try:
        server.serve_forever(poll_interval=0.2)
        if not server.unanswered.wait_until_none(STOP_WAIT):
            log.warning("stopping with requests still unanswered after %.0f s", STOP_WAIT)
    finally:
        server.server_close()
        recorder.stop()
    log.info("API stopped")
