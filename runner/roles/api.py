"""MODE=api: the Flask API (migrations first when MIGRATION_ENABLED), served by werkzeug."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from typing import TYPE_CHECKING

from werkzeug.serving import ThreadedWSGIServer

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


class LimitedThreadedServer(ThreadedWSGIServer):
    """A thread per connection, at most SERVER_WORKER_CONNECTIONS requests served at once."""

    def __init__(self, *args, connections: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.slots = threading.BoundedSemaphore(connections)
        self.daemon_threads = True

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
    finally:
        server.server_close()
        recorder.stop()
    log.info("API stopped")
