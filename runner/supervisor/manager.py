"""The supervision loop: start in stages, wait for real readiness, restart what crashes, stop in
reverse. Events (output lines, exits, probe results) arrive on one queue, as in honcho's manager;
the printer knows nothing about processes."""

from __future__ import annotations

import collections
import datetime
import logging
import logging.handlers
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from honcho.colour import get_colours
from honcho.printer import Message, Printer

from runner.beat_schedule import build_beat_schedule
from runner.logs import SUPERVISED_VARIABLE
from runner.roles.common import PROCESS_NAME_VARIABLE
from runner.settings import Settings, mask_command, mask_url
from runner.supervisor.probes import BrokerClients, probe_for
from runner.supervisor.process import Exited, ManagedProcess, StopPolicy
from runner.supervisor.procfile import ProcessSpec, describe

SYSTEM = "system"
BROKER_START_TIMEOUT = 15.0
CRASH_WINDOW = 60.0  # seconds
CRASHES_BEFORE_FAILED = 5
BACKOFF_FIRST, BACKOFF_CAP = 1.0, 30.0
PROBE_INTERVAL = 0.1
TAIL_REPORTED = 20
POOL_NAMES = {"thread": "threads", "prefork": "prefork", "solo": "solo", "gevent": "gevent", "eventlet": "eventlet"}


@dataclass
class ProcessState:
    process: ManagedProcess
    stage: int
    ready: bool = False
    failed: bool = False
    crashes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=CRASHES_BEFORE_FAILED))
    restart_at: float | None = None
    probe_deadline: float = 0.0
    reported_slow: bool = False
    ever_ready: bool = False


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def executable_dir() -> str:
    """The folder holding the running `dify-local` (the virtualenv's bin, or the binary's folder),
    put first on children's PATH so every `dify-local serve …` line runs this same installation."""
    return str(Path(sys.executable).resolve().parent if getattr(sys, "frozen", False) else Path(sys.executable).parent)


class Supervisor:
    def __init__(self, settings: Settings, specs: list[ProcessSpec], *, ready_timeout: float = 60.0,
                 grace: float = 10.0, output=None):
        self.settings = settings
        self.ready_timeout = ready_timeout
        self.grace = grace
        self.events: queue.Queue = queue.Queue()
        self.printer = Printer(output or sys.stdout)
        self.clients = BrokerClients(settings)
        self.stopping = threading.Event()
        self.force = threading.Event()
        self.ready_announced = False
        self.started = time.monotonic()
        self.log_file = self._open_log_file()
        colours = get_colours()
        self.states: list[ProcessState] = []
        stage_of = {"broker": 0}
        if settings.uses_embedded_broker and not any(spec.role == "broker" for spec in specs):
            specs = [describe("broker", "dify-local serve broker"), *specs]  # every project gets the broker
        if not settings.uses_embedded_broker:
            specs = [spec for spec in specs if spec.role != "broker"]
        for spec in specs:
            process = ManagedProcess(spec, self._environment(spec), str(settings.project_dir), self.events,
                                     next(colours), StopPolicy.for_role(spec.role, grace))
            self.states.append(ProcessState(process, stage_of.get(spec.role or "", 1)))
        self.printer.width = max([len(SYSTEM)] + [len(state.process.name) for state in self.states])

    # -- set-up ----------------------------------------------------------------------------------

    def _open_log_file(self) -> logging.Logger | None:
        if not self.settings.LOG_FILE:
            return None
        path = Path(self.settings.LOG_FILE).expanduser()
        path = path if path.is_absolute() else self.settings.project_dir / path
        path.parent.mkdir(parents=True, exist_ok=True)
        logger = logging.getLogger("dify_local.supervisor.logfile")
        logger.propagate = False
        handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=self.settings.LOG_FILE_MAX_SIZE * 1024 * 1024,
            backupCount=self.settings.LOG_FILE_BACKUP_COUNT, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        return logger

    def _environment(self, spec: ProcessSpec) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.settings.command_line_environment())
        env.update({
            SUPERVISED_VARIABLE: "1",
            PROCESS_NAME_VARIABLE: spec.name,
            "PYTHONUNBUFFERED": "1",
            "PATH": executable_dir() + os.pathsep + env.get("PATH", ""),
        })
        if self.settings.uses_embedded_broker:
            env["CELERY_BROKER_URL"] = self.settings.broker_url
            env["REDIS_URL"] = self.settings.embedded_url(0)
        return env

    # -- output ------------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        self._print(Message(type="line", data=text, time=datetime.datetime.now(), name=SYSTEM, colour=None))

    def _print(self, message: Message) -> None:
        self.printer.write(message)
        if self.log_file is not None:
            self.log_file.info("%s %s | %s", message.time.strftime("%H:%M:%S"), message.name, message.data)

    # -- lifecycle -------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        if self.stopping.is_set():
            self.force.set()
            self.events.put(Message("wake", None, datetime.datetime.now(), SYSTEM, None))
            return
        self.stopping.set()
        self.events.put(Message("wake", None, datetime.datetime.now(), SYSTEM, None))

    def _start(self, state: ProcessState) -> None:
        process = state.process
        try:
            process.start()
        except OSError as error:
            self.say(f"cannot start {process.name} ({mask_command(process.spec.command)}): {error.strerror or error}")
            state.failed = True
            return
        state.ready = False
        state.reported_slow = False
        timeout = BROKER_START_TIMEOUT if process.spec.role == "broker" else self.ready_timeout
        state.probe_deadline = time.monotonic() + timeout
        self.say(f"{process.name} started (pid {process.pid}): {mask_command(process.spec.command)}")
        threading.Thread(target=self._probe, args=(state, process.pid), name=f"probe-{process.name}",
                         daemon=True).start()

    def _probe(self, state: ProcessState, pid: int) -> None:
        process = state.process
        probe = probe_for(process.spec.role, self.settings, self.clients)
        while not self.stopping.is_set() and process.pid == pid and process.running():
            if probe(process):
                self.events.put(Message("ready", pid, datetime.datetime.now(), process.name, None))
                return
            time.sleep(PROBE_INTERVAL)

    def _report_slow(self, state: ProcessState) -> None:
        process = state.process
        state.reported_slow = True
        waited = time.monotonic() - process.started_at
        broker_address = f"{self.settings.REDIS_HOST}:{self.settings.REDIS_PORT}"
        what = {
            "broker": f"does it answer PING with the password on {broker_address}?",
            "api": f"does {self.settings.api_url}/health answer?",
            "worker": "can it reach the broker, and does it answer `celery inspect ping`?",
            "beat": "can it reach the broker (its heartbeat is written there)?",
        }.get(process.spec.role or "", "is the command right?")
        self.say(f"{process.name} is not ready after {waited:.0f} s; {what} Its last lines:")
        for line in list(process.tail)[-TAIL_REPORTED:]:
            self.say(f"  {line}")

    def _handle(self, message: Message) -> None:
        if message.type == "line":
            self._print(message)
            return
        state = next((s for s in self.states if s.process.name == message.name), None)
        if message.type == "ready" and state and state.process.pid == message.data and not self.stopping.is_set():
            state.ready = state.ever_ready = True
            elapsed = time.monotonic() - state.process.started_at
            self.say(f"{state.process.name} ready ({elapsed:.1f} s)")
        elif message.type == "exit" and state and not self.stopping.is_set():
            self._on_exit(state, message.data)

    def _fail(self, state: ProcessState, why: str) -> None:
        state.failed = True
        self.say(f"{state.process.name} {why}. Its last lines:")
        for line in list(state.process.tail)[-TAIL_REPORTED:]:
            self.say(f"  {line}")

    def _on_exit(self, state: ProcessState, exited: Exited) -> None:
        state.ready = False
        now = time.monotonic()
        state.crashes.append(now)
        name = state.process.name
        if state.stage == 0 and not state.ever_ready:
            # Nothing else can run without the broker: no point retrying one that never came up.
            self._fail(state, f"{describe_exit(exited.returncode)} before it was ready")
            return
        if len(state.crashes) == CRASHES_BEFORE_FAILED and now - state.crashes[0] <= CRASH_WINDOW:
            self._fail(state, f"{describe_exit(exited.returncode)} and has crashed {CRASHES_BEFORE_FAILED} times "
                              f"in {CRASH_WINDOW:.0f} s: marked failed, not restarted")
            return
        recent = sum(1 for moment in state.crashes if now - moment <= CRASH_WINDOW)
        delay = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (recent - 1))
        state.restart_at = now + delay
        self.say(f"{name} {describe_exit(exited.returncode)}; restarting in {delay:.0f} s")

    def _tick(self) -> None:
        """Restarts that are due, and readiness that is overdue."""
        now = time.monotonic()
        for state in self.states:
            if state.restart_at is not None and now >= state.restart_at and not state.failed:
                state.restart_at = None
                self._start(state)
            if (state.process.running() and not state.ready and not state.reported_slow
                    and now > state.probe_deadline):
                self._report_slow(state)

    def _pump(self, timeout: float) -> None:
        try:
            message = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        self._handle(message)
        while True:
            try:
                self._handle(self.events.get_nowait())
            except queue.Empty:
                return

    def _stage_settled(self, stage: int) -> bool:
        return all(state.ready or state.failed for state in self.states if state.stage == stage)

    def run(self) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        status = 0
        try:
            for stage in sorted({state.stage for state in self.states}):
                if self.stopping.is_set():
                    break
                members = [state for state in self.states if state.stage == stage]
                for state in members:
                    self._start(state)
                while not self.stopping.is_set() and not self._stage_settled(stage):
                    self._pump(0.1)
                    self._tick()
                    if stage == 0 and any(s.reported_slow or s.failed for s in members):
                        self.say("the broker did not start, so nothing else can: stopping")
                        self.stopping.set()
                        status = 1
            while not self.stopping.is_set():
                if not self.ready_announced and all(s.ready for s in self.states if not s.failed):
                    self._announce_ready()
                self._pump(0.2)
                self._tick()
        finally:
            self._stop_all()
            self.clients.close()
        return status

    # -- the ready line --------------------------------------------------------------------------

    def _worker_summary(self, state: ProcessState) -> str:
        node = state.process.spec.node_name()
        try:
            stats = self.clients.celery.control.inspect(destination=[node], timeout=1.0).stats() or {}
            pool = stats[node]["pool"]
            kind = POOL_NAMES.get(pool["implementation"].split(":")[0].rsplit(".", 1)[-1], pool["implementation"])
            return f"{state.process.name} {kind}×{pool['max-concurrency']}"
        except Exception:
            return state.process.name

    def _announce_ready(self) -> None:
        self.ready_announced = True
        parts = []
        roles = {state.process.spec.role: state for state in self.states if not state.failed}
        if "api" in roles:
            parts.append(f"API {self.settings.api_url}")
        broker = "embedded" if self.settings.uses_embedded_broker else "external"
        parts.append(f"broker {mask_url(self.settings.broker_url)} ({broker})")
        workers = [state for state in self.states if state.process.spec.role == "worker" and not state.failed]
        if workers:
            consumed: set[str] = set()
            for state in workers:
                consumed.update(state.process.spec.queues or self.settings.CELERY_QUEUES)
            parts.append(f"{len(consumed)} queues")
            parts.extend(self._worker_summary(state) for state in workers)
        if "beat" in roles:
            parts.append(f"beat with {len(build_beat_schedule(self.settings))} periodic tasks")
        others = [s.process.name for s in self.states if s.process.spec.role is None and not s.failed]
        if others:
            parts.append("also " + ", ".join(others))
        failed = [s.process.name for s in self.states if s.failed]
        if failed:
            parts.append("FAILED: " + ", ".join(failed))
        elapsed = time.monotonic() - self.started
        self.say(f"ready in {elapsed:.1f} s: " + " · ".join(parts) + " · Ctrl-C stops everything")

    # -- stopping --------------------------------------------------------------------------------

    def _stop_all(self) -> None:
        self.stopping.set()
        if any(state.process.running() for state in self.states):
            self.say("stopping (Ctrl-C again to force)")
        for stage in sorted({state.stage for state in self.states}, reverse=True):
            members = [state for state in reversed(self.states) if state.stage == stage]
            threads = [threading.Thread(target=self._stop_one, args=(state,), daemon=True) for state in members]
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                self._pump(0.1)
            for thread in threads:
                thread.join()
        self._pump(0.05)
        self.say("stopped")

    def _stop_one(self, state: ProcessState) -> None:
        process = state.process
        if process.popen is None:
            return
        was_running = process.running()
        started = time.monotonic()
        status = process.stop(self.force)
        if was_running:
            self.say(f"{process.name} stopped (status {status}, {time.monotonic() - started:.1f} s)")
