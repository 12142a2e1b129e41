"""What every role does before serving: logging, the state folder, the database, the Celery app."""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from typing import TYPE_CHECKING, Callable

from runner.errors import StateError
from runner.logs import configure_logging
from runner.process_env import PROCESS_NAME, SUPERVISOR
from runner.settings import Settings, mask_url
from runner.state import StatePaths

if TYPE_CHECKING:
    from celery import Celery

    from runner.store.task_runs import TaskRunRecorder


log = logging.getLogger("dify_local")
BROKER_WAIT = 60.0  # seconds a role waits for the broker before giving up
BROKER_LAST = 2.0  # seconds the broker waits, once `up` is gone, before it stops itself (as the watchdog asks)


class RoleStartError(Exception):
    """A role cannot start: the message says why and what to do. `user_must_fix`: nothing changes
    by trying again (a corrupt database, a link in the state folder), so `up` marks the role failed
    at once rather than restarting it."""

    def __init__(self, message: str, user_must_fix: bool = False):
        super().__init__(message)
        self.user_must_fix = user_must_fix


class BrokerUnreachable(RoleStartError):
    pass


def process_name(default: str) -> str:
    return os.environ.get(PROCESS_NAME) or default


def start_role(settings: Settings, role: str) -> StatePaths:
    from runner.state_access import make_private

    configure_logging(settings, role)
    stop_when_supervisor_is_gone(after=BROKER_LAST if role == "broker" else 0.0)
    try:
        tightened = make_private(settings.state_dir)  # under `up`, done already
    except StateError as error:  # StateFolderRefused, a link
        raise RoleStartError(str(error), user_must_fix=True) from None
    if tightened:
        log.warning("%s", tightened)
    try:
        return StatePaths(settings.state_dir).ensure()
    except StateError as error:
        raise RoleStartError(str(error), user_must_fix=True) from None


def supervisor_alive(identity: str) -> bool:
    """Whether the `up` named by SUPERVISOR ("pid:start time") still runs (not another process
    that got its pid since)."""
    from runner.process_identity import alive

    return alive(identity)


def stop_when_supervisor_is_gone(every: float = 1.0, after: float = 0.0) -> None:
    """Under `up`: stop this role the way `up` would (SIGTERM to itself) once `up` is gone, `after`
    seconds more (the broker: the others may still need it). An `up` killed with -9 cannot stop its
    processes: its watchdog does (runner.supervisor.watchdog); this is for a watchdog killed too."""
    identity = os.environ.get(SUPERVISOR, "")
    if not identity or not supervisor_alive(identity):
        return  # not under `up` (or it is gone already: then the supervisor's checks never passed)

    def watch() -> None:
        while supervisor_alive(identity):
            time.sleep(every)
        log.warning("`up` (pid %s) is gone: stopping", identity.partition(":")[0])
        time.sleep(after)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def celery_for_role(settings: Settings, poll_results: bool = False, register_tasks: bool = True,
                    wait_out_refused_writes: bool = False) -> tuple[Celery, TaskRunRecorder]:
    """The Celery app with its metadata store migrated (or checked) and task recording on.

    `register_tasks`: import the task modules (see create_celery_app); roles that only send leave them out.
    `wait_out_refused_writes`: see create_celery_app.
    Imported here, not at the top: the broker role runs without Celery in memory.
    """
    from runner.celery_app import create_celery_app
    from runner.dead_letters import install_dead_letters
    from runner.recording import install_task_recording
    from runner.store import SchemaOutOfDate, prepare_database
    from runner.store.database import DatabaseBusy

    app = create_celery_app(settings, poll_results, register_tasks, wait_out_refused_writes)
    try:
        prepare_database(app.dify.database, migrate=settings.MIGRATION_ENABLED)
    except DatabaseBusy as error:
        raise RoleStartError(str(error)) from None
    except (SchemaOutOfDate, StateError) as error:
        raise RoleStartError(str(error), user_must_fix=True) from None
    wait_for_broker(app)
    install_dead_letters(app)
    return app, install_task_recording(app)


def wait_for_broker(app: Celery, timeout: float = BROKER_WAIT) -> None:
    """Return once the broker answers PING. `up` starts the roles together with the broker so
    their imports overlap its start; this is where they wait for it, polling every 50 ms rather
    than in Celery's retry steps of seconds. A refused password or certificate ends the wait at
    once: only a change of settings helps."""
    from runner.broker_config import FINAL, explain_broker_error

    settings = app.dify.settings
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        try:
            with app.connection_for_write() as connection:
                connection.default_channel.client.ping()
            return
        except Exception as error:
            kind, explained = explain_broker_error(error, settings, app.conf.broker_url)
            if kind in FINAL:
                raise BrokerUnreachable(explained) from None
            if time.monotonic() > deadline:
                raise BrokerUnreachable(f"{explained} (waited {timeout:.0f} s)") from None
            if not announced and time.monotonic() > deadline - timeout + 1:
                log.info("waiting for the broker at %s (%s)", mask_url(app.conf.broker_url), error)
                announced = True
            time.sleep(0.05)


def stop_on_signals(stop: Callable[[], None]) -> None:
    """Run `stop` (from a helper thread, as servers' shutdown must be) on SIGTERM or SIGINT. The
    handler only puts on a SimpleQueue, which is reentrant: a handler that takes a lock the main
    thread may hold deadlocks (see runner.supervisor.manager.Supervisor._on_signal)."""
    signals: queue.SimpleQueue = queue.SimpleQueue()

    def follow() -> None:
        while True:
            signals.get()
            stop()

    threading.Thread(target=follow, name="shutdown", daemon=True).start()

    def handler(signum, frame):
        signals.put(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
