"""Checks `up` makes before starting anything: our workers on our queues (every route consumed is
a warning), the ports free, a real broker that takes our password and certificate."""

from __future__ import annotations

import errno
import socket

from runner import topology
from runner.settings import Settings
from runner.supervisor.procfile import ProcessSpec


def our_workers(specs: list[ProcessSpec]) -> list[ProcessSpec]:
    """The worker lines that run our backend's app (`dify-local serve worker`, or it through Celery's CLI)."""
    from runner.app_topology import is_builtin

    return [spec for spec in specs if spec.role == "worker" and (spec.is_ours or is_builtin(spec.celery_app))]


def consumed_queues(specs: list[ProcessSpec], settings: Settings) -> dict[str, list[str]]:
    """queue → the Procfile processes whose workers of our backend consume it."""
    consumers: dict[str, list[str]] = {}
    for spec in our_workers(specs):
        for queue in spec.queues or settings.CELERY_QUEUES:
            consumers.setdefault(queue, []).append(spec.name)
    return consumers


def route_problems(specs: list[ProcessSpec], settings: Settings) -> list[str]:
    """What `up` refuses: a worker of our backend told to consume a queue our backend has no task for
    (a typo). A project's own Celery app is checked against itself (runner.app_topology), never
    against our 16, and a worker on a subset of the queues is never refused."""
    problems = []
    for spec in our_workers(specs):
        given = f"process {spec.name!r} (-Q)" if spec.queues else f"process {spec.name!r} (CELERY_QUEUES)"
        problems += topology.unknown_queue_problems(spec.queues or settings.CELERY_QUEUES, given)
    return problems


def route_warnings(specs: list[ProcessSpec], settings: Settings) -> list[str]:
    """One line per task of our backend whose queue no worker of the Procfile consumes (Dify has
    shipped this bug): said at start, not refused, since a partial stack is a normal way to work."""
    from runner.app_topology import runs_our_backend

    if not runs_our_backend(specs):
        return []  # not our backend: a project's own app is checked against itself (runner.app_topology)
    missing: dict[str, list[str]] = {}
    for task, queue in topology.unconsumed_routes(consumed_queues(specs, settings)):
        missing.setdefault(queue, []).append(task)
    return [f"queue {queue!r} has tasks routed to it ({', '.join(tasks)}) but no worker in the Procfile "
            "consumes it: its messages wait; add it to a worker's -Q or to CELERY_QUEUES"
            for queue, tasks in missing.items()]


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def port_problems(specs: list[ProcessSpec], settings: Settings) -> list[str]:
    problems = []
    roles = {spec.role for spec in specs}
    if settings.uses_embedded_broker and port_in_use(settings.REDIS_HOST, settings.REDIS_PORT):
        problems.append(f"port {settings.REDIS_PORT} on {settings.REDIS_HOST} is in use, so the embedded broker "
                        "cannot listen there: stop what uses it, pick another with --broker-port or REDIS_PORT, "
                        "or use that Redis with --broker redis://…")
    if "api" in roles and port_in_use(settings.DIFY_BIND_ADDRESS, settings.DIFY_PORT):
        problems.append(f"port {settings.DIFY_PORT} on {settings.DIFY_BIND_ADDRESS} is in use, so the API cannot "
                        "listen there: stop what uses it, or pick another with --port or DIFY_PORT")
    return problems


def broker_problems(settings: Settings, timeout: float = 5.0) -> list[str]:
    """A real broker (CELERY_BROKER_URL) that refuses the password or the certificate, named before
    anything starts; every role would only stop on it. One that does not answer yet is left to the
    roles, which wait for it."""
    if settings.uses_embedded_broker:
        return []
    from runner.broker_config import FINAL, broker_connection, explain_broker_error

    connection = broker_connection(settings, timeout)
    try:
        connection.ensure_connection(max_retries=0)
        connection.default_channel.client.ping()
    except Exception as error:
        kind, explained = explain_broker_error(error, settings, settings.broker_url)
        return [explained] if kind in FINAL else []
    finally:
        connection.release()
    return []
