"""MODE=api: the Flask API (migrations first when MIGRATION_ENABLED), served by waitress
(runner.roles.api_server says how slow clients are kept from starving it)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from typing import TYPE_CHECKING

from runner.api import create_api, largest_body
from runner.process_env import LISTEN_FD
from runner.reload import child
from runner.roles.api_server import STOP_WAIT, make_server
from runner.roles.common import RoleStartError, celery_for_role, start_role, stop_on_signals
from runner.settings import Settings
from runner.supervisor.listeners import listen

if TYPE_CHECKING:
    from celery import Celery

    from runner.store.task_runs import TaskRunRecorder

log = logging.getLogger("dify_local.api")


class ApiStartError(RoleStartError):
    pass


def api_celery(settings: Settings) -> tuple[Celery, TaskRunRecorder]:
    """The API's Celery app: it polls results and sends tasks by name, without importing a task
    module (their signatures come from their source, runner.task_catalogue)."""
    return celery_for_role(settings, poll_results=True, register_tasks=False)


def held_socket(host: str, port: int) -> socket.socket | None:
    """The listening socket `up` holds for the API across its restarts (runner.supervisor.listeners),
    if it listens where this API is to listen; None to bind one of our own."""
    fd = os.environ.pop(LISTEN_FD, "")
    if not fd.isdigit():
        return None
    try:
        held = socket.socket(fileno=int(fd))
        address = held.getsockname()
    except OSError:
        return None
    try:
        wanted = {info[4][:2] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        wanted = set()
    if address[:2] in wanted:
        return held
    held.close()  # our inherited copy only: `up` keeps its own
    return None


def listening_socket(host: str, port: int) -> socket.socket:
    sock = held_socket(host, port)
    if sock is not None:
        return sock
    try:
        return listen(host, port)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ApiStartError(f"port {port} on {host} is in use: set DIFY_PORT or use --port") from None
        raise ApiStartError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def serve_api(settings: Settings) -> None:
    start_role(settings, "api")
    celery, recorder = api_celery(settings)
    app = create_api(settings, celery)
    host, port = settings.DIFY_BIND_ADDRESS, settings.DIFY_PORT
    child.loaded()  # taking over, this waits until the API it replaces has let go of the port
    sock = listening_socket(host, port)
    server = make_server(app, sock, threads=settings.SERVER_WORKER_CONNECTIONS, max_body=largest_body(settings))
    stopping = threading.Event()

    def stop() -> None:
        stopping.set()
        server.pull_trigger()  # wakes the event loop

    stop_on_signals(stop)
    log.info("API listening on %s", settings.api_url)
    child.serving()
    try:
        server.serve_until(stopping)
        if not server.drain(STOP_WAIT):
            log.warning("stopping with requests still unanswered after %.0f s", STOP_WAIT)
    finally:
        server.close_all()
        recorder.stop()
    log.info("API stopped")
