"""What every check returns, and what the checks share: the settings, one broker client, the
Celery app, the running `up`'s answer, and what the workers said, each fetched once."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from runner.monitor.heartbeats import read_heartbeats
from runner.settings import Settings

PASS, FAIL, WARN, SKIP = "pass", "fail", "warn", "skip"
BROKER_TIMEOUT = 2.0  # seconds to connect to the broker, and for each of its answers
PING_TIMEOUT = 1.0  # seconds the workers get to answer each broadcast (Celery's own default)
APP_TIMEOUT = 60.0  # seconds to import a project's own Celery app (a Dify app takes about 20)


@dataclass
class Result:
    name: str
    status: str
    detail: str
    fix: str = ""
    lines: list[str] = field(default_factory=list)  # particulars shown under the detail (queues, documents)
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WorkerSnapshot:
    pinged: list[str]  # nodes that answered a ping
    queues_of: dict[str, list[str]]  # node → queues it consumes (active_queues)
    heartbeats: dict[str, dict]  # node → its heartbeat key's value (runner.worker_heartbeat)


class Context:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.results: dict[str, Result] = {}
        self._lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._values: dict[str, Any] = {}
        self._connection = None
        self._app = None

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        """`compute()` the first time `key` is asked for, by whichever check asks first; the
        others wait for it (an error is raised to each of them)."""
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._values:
                try:
                    self._values[key] = (True, compute())
                except Exception as error:
                    self._values[key] = (False, error)
            ok, value = self._values[key]
        if not ok:
            raise value
        return value

    def broker_ok(self) -> bool:
        result = self.results.get("broker")
        return result is not None and result.status == PASS

    def client(self):
        """A redis-py client for the broker (through kombu, so sentinel:// and rediss:// work as
        for the roles), every operation bounded by BROKER_TIMEOUT."""
        def connect():
            from runner.broker_config import broker_connection

            self._connection = broker_connection(self.settings, BROKER_TIMEOUT)
            self._connection.ensure_connection(max_retries=0)
            return self._connection.default_channel.client
        return self.once("client", connect)

    def celery(self):
        def create():
            from runner.celery_app import create_celery_app

            self._app = create_celery_app(self.settings, register_tasks=False)
            return self._app
        return self.once("celery", create)

    def specs(self) -> list:
        """The project's Procfile lines (the built-in one's when it has none; none when it cannot be read)."""
        def read():
            from runner.supervisor.procfile import ProcfileError, load_procfile

            try:
                return load_procfile(self.settings.project_dir)[0]
            except ProcfileError:
                return []
        return self.once("specs", read)

    def runs_our_backend(self) -> bool:
        """Whether the project runs dify-local's own backend (its migrations, documents and beat apply)."""
        from runner.app_topology import runs_our_backend

        specs = self.specs()
        return not specs or runs_our_backend(specs)

    def app_line(self):
        from runner.app_topology import app_line

        return app_line(self.specs())

    def app_topology(self):
        """The project's own Celery app's topology (runner.app_topology), imported once; None when the
        Procfile runs no such app. An import that fails raises AppTopologyError."""
        def ask():
            from runner.app_topology import probe, probe_environment

            line = self.app_line()
            return None if line is None else probe(line, self.settings.project_dir, timeout=APP_TIMEOUT,
                                                   env=probe_environment(self.settings))
        return self.once("app_topology", ask)

    def supervisor(self) -> dict | None:
        """The running `up`'s `ps` answer for this state folder, or None when none answers."""
        def ask():
            from runner.supervisor import control

            try:
                answer = control.request(self.settings.state_dir, {"command": "ps"}, timeout=BROKER_TIMEOUT)
            except (control.NotRunning, OSError, ValueError):
                return None
            return answer if answer.get("ok") else None
        return self.once("supervisor", ask)

    def workers(self) -> WorkerSnapshot:
        def ask():
            from runner.broker_config import WORKER_HEARTBEAT_PREFIX
            from runner.monitor.workers import active_queues, inspect

            app = self.celery()
            pinged = sorted(inspect(app, "ping", PING_TIMEOUT))
            # one broadcast after the other: at once, each round would take (and drop) the other's replies
            queues_of = active_queues(app, PING_TIMEOUT)
            return WorkerSnapshot(pinged, queues_of, read_heartbeats(self.client(), WORKER_HEARTBEAT_PREFIX))
        return self.once("workers", ask)

    def processes(self, role: str) -> list[dict]:
        """The running `up`'s processes of `role` (its `ps` rows), for advice that fits."""
        answer = self.supervisor()
        return [row for row in (answer or {}).get("processes", []) if row.get("role") == role]

    def close(self) -> None:
        database = self._values.get("database", (False, None))[1]
        for resource in (self._connection, self._app, database):
            if resource is not None:
                try:
                    resource.close()
                except Exception:  # already broken: nothing left to release
                    pass

