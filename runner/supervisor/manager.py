"""The supervision loop: start, wait for real readiness, restart what crashes, answer the control
socket, stop in reverse. Everything that happens (output lines, exits, probe results, control
requests) arrives as a message on one queue, as in honcho's manager, and only this loop changes
a process's state; the printer knows nothing about processes.

Start: the broker and dify-local's own roles together (ours wait for the broker to answer before
they connect, so their imports overlap its start), other projects' processes once the broker
answers. Stop: other processes, then ours, then the broker.
"""

from __future__ import annotations

import collections
import datetime
import fnmatch
import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from honcho.colour import get_colours
from honcho.printer import Message, Printer

from runner import __version__
from runner.another_project import broker_environment
from runner.beat_schedule import enabled as enabled_periodic_tasks
from runner.errors import EXIT_USER_MUST_FIX
from runner.frozen import foreign_environment, program_dir
from runner.log_handlers import RotatingLogFile
from runner.monitor.workers import pool_name
from runner.process_env import ENV_FILES, PROCESS_NAME, SUPERVISED, SUPERVISOR, WATCH_ROOTS
from runner.process_identity import identity_of
from runner.reload.foreign import bootstrapped
from runner.reload.watcher import WatchPlan
from runner.settings import Settings, mask_command, mask_url
from runner.settings.kinds import host_port
from runner.state_access import StateLock
from runner.supervisor import control
from runner.supervisor.cgroup import Cgroup
from runner.supervisor.listeners import ApiListener
from runner.supervisor.logfiles import LogLine, ProcessLogFiles
from runner.supervisor.foreign_readiness import web_address
from runner.supervisor.options import ProcessOptions
from runner.supervisor.probes import BrokerLink, probe_for, write_refusal_reason
from runner.supervisor.reloads import Reloads
from runner.supervisor.process import Exited, ManagedProcess
from runner.supervisor.procfile import ProcessSpec, describe
from runner.supervisor.tree import alive, become_subreaper, descendants, kill, memory_of, reap_orphans, suspended
from runner.supervisor.watchdog import Watchdog

SYSTEM = "system"
BROKER_START_TIMEOUT = 15.0
CRASH_WINDOW = 60.0  # seconds
CRASHES_BEFORE_FAILED = 5
BACKOFF_FIRST, BACKOFF_CAP = 1.0, 30.0
PROBE_INTERVAL = 0.05
TAIL_REPORTED = 20
HISTORY_LINES = 5000  # kept in memory for `logs -f`, which starts with the latest ones
CONTROL_TIMEOUT = 10.0
REAP_INTERVAL = 2.0  # seconds between sweeps for re-parented orphans (a sweep reads /proc)
BROKER, OURS, OTHERS = 0, 1, 2  # stages


@dataclass
class ProcessState:
    process: ManagedProcess
    stage: int
    status: str = "pending"  # starting ready backoff stopping restarting stopped failed finished
    ever_ready: bool = False
    restarts: int = 0
    last_exit: int | None = None
    crashes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=CRASHES_BEFORE_FAILED))
    restart_at: float | None = None
    probe_deadline: float = 0.0
    reported_slow: bool = False
    failure: dict | None = None  # what the current process reported when it failed to load

    @property
    def name(self) -> str:
        return self.process.name

    @property
    def settled(self) -> bool:
        """Ready, or in a state that will not become ready by itself."""
        return self.status in ("ready", "finished", "failed", "stopped")


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class Supervisor:
    def __init__(self, settings: Settings, specs: list[ProcessSpec], options: dict[str, ProcessOptions],
                 dotenv: dict[str, str] | None = None, *, ready_timeout: float = 60.0, grace: float = 10.0,
                 output=None, watch: WatchPlan | None = None, read_by_up: set[Path] | None = None,
                 lock: StateLock | None = None, api_moved: tuple[int, str] | None = None):
        self.settings = settings
        self.api_moved = api_moved  # (the port our API was to take, who holds it): it took a free one
        self.lock = lock  # the state folder's, held by this process (and its watchdog)
        self.cgroup: Cgroup | None = None
        self.watchdog: Watchdog | None = None
        self.ready_timeout = ready_timeout
        self.dotenv = dotenv or {}
        self.events: queue.Queue = queue.Queue()
        self.signals: queue.SimpleQueue = queue.SimpleQueue()  # from the signal handler (see _on_signal)
        self.identity = identity_of()  # roles watch it (SUPERVISOR); the watchdog finds them by it
        self.printer = Printer(output or sys.stdout)
        self.link = BrokerLink(settings)
        self.stopping = threading.Event()
        self.force = threading.Event()
        self.broker_ready = threading.Event()  # probes that talk to the broker wait for it
        self.ready_announced = False
        self.started = time.monotonic()
        self.state_dir = settings.state_dir
        self.log_file = self._open_log_file()
        self.log_files = ProcessLogFiles(self.state_dir / "logs", settings.LOG_FILE_MAX_SIZE * 1024 * 1024,
                                         settings.LOG_FILE_BACKUP_COUNT)
        self.history: collections.deque[LogLine] = collections.deque(maxlen=HISTORY_LINES)
        self.subscribers: list[queue.Queue] = []
        self.feed_lock = threading.Lock()
        self.control_server: control.ControlServer | None = None
        self.next_reap = 0.0
        self.watch = watch
        if settings.uses_embedded_broker and not any(spec.role == "broker" for spec in specs):
            specs = [describe("broker", "dify-local serve broker"), *specs]  # every project gets the broker
        if not settings.uses_embedded_broker:
            specs = [spec for spec in specs if spec.role != "broker"]
            self.broker_ready.set()
        colours = get_colours()
        self.states: list[ProcessState] = []
        for spec in specs:
            env = self._environment(spec)
            if watch is not None:  # another project's Celery worker or beat: run through our bootstrap to reload fast
                spec = bootstrapped(spec, env)
            process = ManagedProcess(spec, options.get(spec.process_type, ProcessOptions()), env,
                                     str(settings.project_dir), self.events, next(colours), grace,
                                     with_channel=watch is not None and Reloads.speaks_channel(spec))
            stage = BROKER if spec.role == "broker" else OURS if spec.is_ours else OTHERS
            self.states.append(ProcessState(process, stage))
        self.printer.width = max([len(SYSTEM)] + [len(state.name) for state in self.states])
        self.api_listener = ApiListener(settings.DIFY_BIND_ADDRESS, settings.DIFY_PORT)
        for state in self.states:
            spec = state.process.spec
            # Our API, on the address of the settings (a Procfile line naming its own keeps binding it).
            if watch is not None and spec.is_ours and spec.role == "api" \
                    and not any(flag in spec.argv for flag in ("--host", "--port")):
                state.process.listener = self.api_listener
        self.reloads = Reloads(self, watch, read_by_up or set()) if watch is not None else None

    # -- set-up ----------------------------------------------------------------------------------

    def _open_log_file(self) -> logging.Logger | None:
        if not self.settings.LOG_FILE:
            return None
        path = Path(self.settings.LOG_FILE).expanduser()
        path = path if path.is_absolute() else self.settings.project_dir / path
        path.parent.mkdir(parents=True, exist_ok=True)
        logger = logging.getLogger("dify_local.supervisor.logfile")
        logger.propagate = False
        handler = RotatingLogFile(
            path, maxBytes=self.settings.LOG_FILE_MAX_SIZE * 1024 * 1024,
            backupCount=self.settings.LOG_FILE_BACKUP_COUNT, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        return logger

    def _environment(self, spec: ProcessSpec) -> dict[str, str]:
        # As honcho builds it: the environment, the .env files, then $PORT and the process name.
        env = dict(os.environ)
        env.update(self.dotenv)
        env.update(spec.env)
        ours, path = program_dir(self.settings.state_dir), env.get("PATH", "")
        if spec.is_ours:  # our flags and --set configure our roles; another project gets the broker below
            env.update(self.settings.command_line_environment())
        env.update({
            SUPERVISED: "1",
            SUPERVISOR: self.identity,
            PROCESS_NAME: spec.name,
            ENV_FILES: "",  # already read into this environment; children must not read them again
            "PYTHONUNBUFFERED": "1",
            # every `dify-local …` line runs this same installation (virtualenv or binary); another
            # project's line finds its own programs first (its celery, its python), ours after them
            "PATH": os.pathsep.join(part for part in ((ours, path) if spec.is_ours else (path, ours)) if part),
        })
        if not spec.is_ours:
            env = foreign_environment(env)
        env.update(broker_environment(self.settings))
        if self.watch is not None:
            env[WATCH_ROOTS] = os.pathsep.join(str(root) for root in self.watch.roots)
        return env

    # -- output ------------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        """Print a line of the supervisor's own (from the loop's thread)."""
        self._print(Message(type="line", data=text, time=datetime.datetime.now(), name=SYSTEM, colour=None))

    def say_later(self, text: str) -> None:
        """The same, from any other thread: the loop prints it, so output stays in one order."""
        self.events.put(Message(type="line", data=text, time=datetime.datetime.now(), name=SYSTEM, colour=None))

    def _print(self, message: Message) -> None:
        self.printer.write(message)
        line = LogLine(message.time, message.name, message.data)
        self.log_files.write(line)
        if self.log_file is not None:
            self.log_file.info("%s %s | %s", message.time.strftime("%H:%M:%S"), message.name, message.data)
        with self.feed_lock:
            self.history.append(line)
            for subscriber in self.subscribers:
                try:
                    subscriber.put_nowait(line)
                except queue.Full:  # a reader too slow to keep up loses lines, never the supervisor
                    pass

    # -- control socket (called from its threads) ---------------------------------------------------

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        replies: queue.Queue = queue.Queue(maxsize=1)
        self.events.put(Message("control", (request, replies), datetime.datetime.now(), SYSTEM, None))
        try:
            return replies.get(timeout=CONTROL_TIMEOUT)
        except queue.Empty:
            return {"ok": False, "error": "the supervisor did not answer in time"}

    def follow(self, request: dict[str, Any], send: Callable[[dict], None]) -> None:
        wanted = self._matcher(request.get("names") or [])
        feed: queue.Queue = queue.Queue(maxsize=10000)
        with self.feed_lock:
            backlog = [line for line in self.history if wanted(line.name)]
            self.subscribers.append(feed)
        try:
            count = int(request.get("lines", 10))
            for line in backlog[-count:] if count else []:
                send({"time": line.time.isoformat(), "name": line.name, "text": line.text})
            while True:
                try:
                    line = feed.get(timeout=1.0)
                except queue.Empty:
                    if self.stopping.is_set() and not any(s.process.running() for s in self.states):
                        return
                    continue
                if line is None:
                    return
                if wanted(line.name):
                    send({"time": line.time.isoformat(), "name": line.name, "text": line.text})
        finally:
            with self.feed_lock:
                self.subscribers.remove(feed)

    def _matcher(self, patterns: list[str]) -> Callable[[str], bool]:
        if not patterns:
            return lambda name: True
        names = {state.name for pattern in patterns for state in self._resolve(pattern)}
        return lambda name: name in names

    # -- lifecycle -------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        # A handler runs in the main thread between two bytecodes, maybe while the main thread holds
        # a lock (inside events.get, Event.set): taking one here can deadlock, as Ctrl-C under load
        # did. SimpleQueue.put is reentrant; the signals thread does the rest.
        self.signals.put(signum)

    def _follow_signals(self) -> None:
        while True:
            self.signals.get()
            if self.stopping.is_set():
                self.force.set()  # a second Ctrl-C
            self.stopping.set()
            self.events.put(Message("wake", None, datetime.datetime.now(), SYSTEM, None))

    def _start(self, state: ProcessState, quiet: bool = False) -> None:
        process = state.process
        state.restart_at = None
        state.failure = None
        try:
            process.start()
        except OSError as error:
            state.status = "failed"
            self.say(f"cannot start {process.name} ({mask_command(process.spec.command)}): {error.strerror or error}")
            return
        state.status = "starting"
        state.reported_slow = False
        timeout = process.options.ready_timeout or (
            BROKER_START_TIMEOUT if process.spec.role == "broker" else self.ready_timeout)
        state.probe_deadline = time.monotonic() + timeout
        if not quiet:
            self.say(f"{process.name} started (pid {process.pid}): {mask_command(process.spec.command)}")
        threading.Thread(target=self._probe, args=(state, process.pid), name=f"probe-{process.name}",
                         daemon=True).start()

    def _probe(self, state: ProcessState, pid: int) -> None:
        process = state.process
        link = BrokerLink(self.settings)  # its own connection: one probe's wait never delays another's
        probe = probe_for(process, self.settings, link)
        if process.spec.role in ("worker", "beat"):
            # Asking before the broker answers only lands kombu in its retry back-off.
            while not self.broker_ready.wait(PROBE_INTERVAL):
                if self.stopping.is_set() or process.pid != pid:
                    return
        try:
            while not self.stopping.is_set() and process.pid == pid and process.running():
                if probe(process):
                    self.events.put(Message("ready", pid, datetime.datetime.now(), process.name, None))
                    return
                time.sleep(PROBE_INTERVAL)
        finally:
            link.close()

    def _stop_in_background(self, state: ProcessState, then: str) -> None:
        """Stop a process without blocking the loop; `then` (restart or stop) arrives as a message."""
        state.status = "restarting" if then == "restart" else "stopping"
        started = time.monotonic()

        def work() -> None:
            status = state.process.stop(self.force)
            self.events.put(Message("stopped", (then, status, time.monotonic() - started),
                                    datetime.datetime.now(), state.name, None))

        threading.Thread(target=work, name=f"stop-{state.name}", daemon=True).start()

    def _report(self, state: ProcessState, why: str) -> None:
        self.say(f"{state.name} {why}. Its last lines:")
        for line in list(state.process.tail)[-TAIL_REPORTED:]:
            self.say(f"  {line}")

    def _report_slow(self, state: ProcessState) -> None:
        process = state.process
        state.reported_slow = True
        waited = time.monotonic() - process.started_at
        if process.options.ready:
            what = f"its probe {process.options.ready} has not passed"
        else:
            what = {
                "broker": f"does it answer PING with the password on {self.settings.REDIS_HOST}:"
                          f"{self.settings.REDIS_PORT}?",
                "api": f"does {self.settings.api_url}/health/api answer?",
                "worker": f"can it reach the broker, and does it answer `celery inspect ping` as "
                          f"{process.spec.node_name()}?",
                "beat": "can it reach the broker (its heartbeat is written there)?" if process.spec.is_ours
                        else "has it written its schedule file or logged 'beat: Starting...'?",
            }.get(process.spec.role or "", self._web_question(process))
        self._report(state, f"is not ready after {waited:.0f} s; {what}")

    def _web_question(self, process: ManagedProcess) -> str:
        address = web_address(process.spec.argv, process.env)
        if address is None or process.spec.is_ours:
            return "is the command right?"
        return f"does http://{host_port(address.host, address.port)}/ answer?"

    def _state(self, name: str) -> ProcessState | None:
        return next((state for state in self.states if state.name == name), None)

    def _handle(self, message: Message) -> None:
        if message.type == "line":
            self._print(message)
            return
        if message.type == "control":
            request, replies = message.data
            try:
                replies.put_nowait(self._control(request))
            except Exception as error:  # a bad request must never take the supervisor down
                replies.put_nowait({"ok": False, "error": f"{type(error).__name__}: {error}"})
            return
        if message.type == "changes":
            if self.reloads is not None:
                self.reloads.changes(message.data)
            return
        state = self._state(message.name)
        if state is None:
            return
        if message.type == "ready" and state.process.pid == message.data and state.status == "starting":
            state.status = "ready"
            state.ever_ready = True
            if state.stage == BROKER:
                self.broker_ready.set()
            if self.reloads is None or not self.reloads.busy(state):  # a reload says so in its own line
                self.say(f"{state.name} ready ({time.monotonic() - state.process.started_at:.1f} s)")
            if self.reloads is not None:
                self.reloads.on_ready(state)
        elif message.type == "said":
            if self.reloads is not None:
                self.reloads.said(state, message.data)
        elif message.type == "retired":
            if self.reloads is not None:
                self.reloads.retired(state, message.data)
        elif message.type == "exit":
            if self.reloads is not None and self.reloads.exited(state, message.data):
                return
            if message.data.pid != state.process.pid:
                return
            state.last_exit = message.data.returncode
            if state.status in ("starting", "ready") and not self.stopping.is_set():
                self._on_exit(state, message.data)
        elif message.type == "stopped":
            then, status, took = message.data
            self.say(f"{state.name} stopped (status {status}, {took:.1f} s)")
            if then == "restart" and not self.stopping.is_set():
                state.restarts += 1
                self._start(state)
            else:
                state.status = "stopped"

    def _on_exit(self, state: ProcessState, exited: Exited) -> None:
        now = time.monotonic()
        policy = state.process.options.restart
        if exited.returncode == 0 and policy in ("on-failure", "never"):
            state.status = "finished"
            self.say(f"{state.name} finished (status 0)")
            return
        if state.stage == BROKER and not state.ever_ready:
            # Nothing else can run without the broker: no point retrying one that never came up.
            state.status = "failed"
            self._report(state, f"{describe_exit(exited.returncode)} before it was ready")
            return
        if policy == "never":
            state.status = "failed"
            self._report(state, f"{describe_exit(exited.returncode)} (restart = never)")
            return
        if self.reloads is not None and self.reloads.broken_code(state, exited):
            return
        if exited.returncode == EXIT_USER_MUST_FIX and state.process.spec.is_ours:
            # a corrupt database, a link in the state folder: no restart fixes it (with reload on,
            # broken_code above said so from the role's own report)
            state.status = "failed"
            said = [line.strip() for line in state.process.tail if "dify-local: " in line]
            why = said[-1].partition("dify-local: ")[2] if said else "a problem only you can fix (see its log)"
            self.say(f"{state.name} cannot start: {why} (marked failed; `dify-local start {state.name}` once that "
                     "is fixed)")
            return
        state.crashes.append(now)
        if len(state.crashes) == CRASHES_BEFORE_FAILED and now - state.crashes[0] <= CRASH_WINDOW:
            state.status = "failed"
            self._report(state, f"{describe_exit(exited.returncode)} and has crashed {CRASHES_BEFORE_FAILED} times "
                                f"in {CRASH_WINDOW:.0f} s: marked failed, not restarted "
                                f"(`dify-local start {state.name}` tries again)")
            return
        recent = sum(1 for moment in state.crashes if now - moment <= CRASH_WINDOW)
        delay = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (recent - 1))
        state.status = "backoff"
        state.restart_at = now + delay
        self.say(f"{state.name} {describe_exit(exited.returncode)}; restarting in {delay:.0f} s")

    def _next_wake(self) -> float:
        """Seconds until something is due (a restart, a readiness deadline, a sweep), at most 1:
        an idle stack wakes the loop once a second, not five times."""
        now = time.monotonic()
        moments = [self.next_reap, *(self.reloads.next_due() if self.reloads is not None else ())]
        for state in self.states:
            if state.status == "backoff" and state.restart_at is not None:
                moments.append(state.restart_at)
            if state.status == "starting" and not state.reported_slow:
                moments.append(state.probe_deadline)
        return max(0.01, min(1.0, min(moments) - now))

    def _tick(self) -> None:
        """Restarts that are due, readiness that is overdue, orphans to reap."""
        now = time.monotonic()
        for state in self.states:
            if state.status == "backoff" and state.restart_at is not None and now >= state.restart_at:
                state.restarts += 1
                self._start(state)
            if state.status == "starting" and not state.reported_slow and now > state.probe_deadline:
                self._report_slow(state)
        if self.reloads is not None:
            self.reloads.tick(now)
        if now >= self.next_reap:
            self.next_reap = now + REAP_INTERVAL
            managed = {state.process.pid for state in self.states if state.process.pid}
            managed |= {self.watchdog.pid} if self.watchdog is not None else set()
            reap_orphans(managed | (self.reloads.pids() if self.reloads is not None else set()))

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

    def start_signal_thread(self) -> None:
        threading.Thread(target=self._follow_signals, name="signals", daemon=True).start()

    def _start_watchdog(self) -> None:
        """Before anything starts (and before any thread: it forks), the watchdog that stops it
        all if this process dies, and the cgroup that holds it all where one can be made."""
        why = ""
        if self.settings.DIFY_LOCAL_CGROUP:
            self.cgroup, why = Cgroup.create() if sys.platform.startswith("linux") else (None, "not Linux")
        watchdog = Watchdog(self.identity, self.cgroup, self.state_dir,
                            keep=(self.lock.fd,) if self.lock is not None and self.lock.fd is not None else ())
        try:
            watchdog.start()
            self.watchdog = watchdog
        except OSError as error:  # no process to spare: our roles still stop themselves without `up`
            self.say(f"cannot start the watchdog ({error.strerror}): should `up` be killed, other projects' "
                     "processes would be left running")
        if self.cgroup is not None:
            why = self.cgroup.join()
            if why:
                self.cgroup = None
        if self.cgroup is None and self.settings.DIFY_LOCAL_CGROUP:
            self.say(f"no writable cgroup ({why}): should `up` be killed, its watchdog finds what it started by "
                     "their environment, and a daemon that clears its own could be left running")

    def run(self) -> int:
        become_subreaper()
        self._start_watchdog()
        self.start_signal_thread()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        self.control_server = control.ControlServer(self.state_dir / control.SOCKET_NAME, self.answer, self.follow)
        self.control_server.start()
        if self.reloads is not None:
            self.reloads.start()
        control.write_info(self.state_dir, {"pid": os.getpid(), "version": __version__, "started": time.time(),
                                            "project_dir": str(self.settings.project_dir),
                                            "settings": self.settings.stack_address(),
                                            # commands asking for that port find our API on its own
                                            "api_moved": {"from": self.api_moved[0], "to": self.settings.DIFY_PORT}
                                            if self.api_moved else None,
                                            # what the next `up` stops, should this one's watchdog die with it
                                            "identity": self.identity,
                                            "cgroup": str(self.cgroup.path) if self.cgroup else None})
        status = 0
        try:
            for state in self.states:
                if state.stage in (BROKER, OURS):
                    self._start(state)
            others_started = False
            while not self.stopping.is_set():
                broker = [s for s in self.states if s.stage == BROKER]
                if broker and broker[0].status == "failed" and not broker[0].ever_ready:
                    self.say("the broker did not start, so nothing else can: stopping")
                    status = 1
                    break
                if not others_started and all(s.status == "ready" for s in broker):
                    others_started = True
                    for state in self.states:
                        if state.stage == OTHERS:
                            self._start(state)
                if not self.ready_announced and others_started and all(s.settled for s in self.states):
                    self._announce_ready()
                self._pump(self._next_wake())
                self._tick()
        finally:
            self._stop_all()
        return status

    # -- control requests --------------------------------------------------------------------------

    def _resolve(self, pattern: str) -> list[ProcessState]:
        """A process by name, all replicas by process type, or a shell-style glob."""
        exact = [state for state in self.states if state.name == pattern]
        if exact:
            return exact
        typed = [state for state in self.states if state.process.spec.process_type == pattern]
        return typed or [state for state in self.states if fnmatch.fnmatchcase(state.name, pattern)]

    def _targets(self, request: dict[str, Any]) -> list[ProcessState] | dict[str, Any]:
        names = request.get("names") or []
        if not names:
            return {"ok": False, "error": "name a process (or a glob such as 'worker*')"}
        found: list[ProcessState] = []
        for pattern in names:
            matched = self._resolve(str(pattern))
            if not matched:
                known = ", ".join(state.name for state in self.states)
                return {"ok": False, "error": f"no process {pattern!r}; the processes are: {known}"}
            found.extend(state for state in matched if state not in found)
        return found

    def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        if command == "ps":
            return {"ok": True, "supervisor": {"pid": os.getpid(), "uptime": time.monotonic() - self.started,
                                               "state_dir": str(self.state_dir), "stopping": self.stopping.is_set(),
                                               "watchdog": self.watchdog.pid if self.watchdog else None,
                                               "cgroup": str(self.cgroup.path) if self.cgroup else None},
                    "processes": [self._with_health(self._row(state)) for state in self.states],
                    "reload": self.reloads.describe() if self.reloads is not None else None}
        if command == "down":
            self.stopping.set()
            return {"ok": True, "pid": os.getpid()}
        if command not in ("restart", "stop", "start"):
            return {"ok": False, "error": f"unknown command {command!r}"}
        if self.stopping.is_set():
            return {"ok": False, "error": "the stack is stopping"}
        targets = self._targets(request)
        if isinstance(targets, dict):
            return targets
        busy = [state.name for state in targets if self.reloads is not None and self.reloads.busy(state)]
        if busy:
            return {"ok": False, "error": f"{', '.join(busy)} is being reloaded; try again in a moment"}
        done = []
        for state in targets:
            running = state.process.running() and state.status in ("starting", "ready")
            if command == "restart":
                if running:
                    self._stop_in_background(state, "restart")
                elif state.status not in ("stopping", "restarting"):
                    state.crashes.clear()
                    state.restarts += 1
                    self._start(state)
            elif command == "stop":
                if self.reloads is not None:
                    self.reloads.forget(state)
                if state.process.listener is not None and not any(
                        other.process.listener is not None and other.process.running() and other is not state
                        for other in self.states):
                    state.process.listener.close()  # stopped on purpose: clients are refused, not kept waiting
                if running:
                    self._stop_in_background(state, "stop")
                elif state.status in ("backoff", "failed", "finished", "pending"):
                    state.status, state.restart_at = "stopped", None
            elif not running and state.status in ("stopped", "failed", "finished", "backoff", "pending"):
                state.crashes.clear()
                self._start(state)
            done.append(state.name)
        return {"ok": True, "processes": done}

    def _row(self, state: ProcessState) -> dict[str, Any]:
        process = state.process
        running = process.running()
        status = state.status
        if running and status == "ready" and suspended(process.pid):  # no exit to see, and it answers nothing
            status = "suspended"
        return {
            "name": state.name, "pid": process.pid if running else None, "status": status,
            "ready": status == "ready", "uptime": time.monotonic() - process.started_at if running else None,
            "restarts": state.restarts, "memory": memory_of(process.pid) if running else None,
            "last_exit": state.last_exit, "role": process.spec.role, "command": mask_command(process.spec.command),
        }

    def _with_health(self, row: dict[str, Any]) -> dict[str, Any]:
        """A ready embedded broker that refuses writes (its disk is full) is degraded: `ps` says why."""
        if row["role"] == "broker" and row["status"] == "ready":
            row["degraded"] = write_refusal_reason(self.settings)
        return row

    # -- the ready line --------------------------------------------------------------------------

    def _worker_summary(self, state: ProcessState) -> str:
        stats = self.link.stats(state.process.spec.node_name())
        try:
            pool = stats["pool"]
            kind = pool_name(pool["implementation"])
            return f"{state.name} {kind}×{pool['max-concurrency']}"
        except (TypeError, KeyError):
            return state.name

    def _announce_ready(self) -> None:
        self.ready_announced = True
        live = [state for state in self.states if state.status in ("ready", "finished")]
        parts = []
        if any(state.process.spec.role == "api" for state in live):
            moved = ""
            if self.api_moved:
                port, holder = self.api_moved
                moved = f"; port {port} is {holder}'s" if holder else f"; port {port} is in use"
            parts.append(f"API {self.settings.api_url} (dashboard {self.settings.api_url}/dashboard{moved})")
        broker = "embedded" if self.settings.uses_embedded_broker else "external"
        parts.append(f"broker {mask_url(self.settings.broker_url)} ({broker})")
        workers = [state for state in live if state.process.spec.role == "worker"]
        if workers:
            consumed: set[str] = set()
            for state in workers:
                spec = state.process.spec
                # another app's worker without -Q consumes what its app says: ask it
                consumed.update(spec.queues or (self.settings.CELERY_QUEUES if spec.is_ours
                                                else self.link.queues(spec.node_name()) or ()))
            parts.append(f"{len(consumed)} queue{'s' if len(consumed) != 1 else ''}")
            parts.extend(self._worker_summary(state) for state in workers)
        beats = [state for state in live if state.process.spec.role == "beat"]
        if any(state.process.spec.is_ours for state in beats):
            parts.append(f"beat with {len(enabled_periodic_tasks(self.settings))} periodic tasks")
        elif beats:
            parts.append("beat (" + ", ".join(state.name for state in beats) + ")")  # its schedule is its app's
        others = [state.name for state in live if state.process.spec.role is None]
        if others:
            parts.append("also " + ", ".join(others))
        failed = [state.name for state in self.states if state.status == "failed"]
        if failed:
            parts.append("FAILED: " + ", ".join(failed))
        elapsed = time.monotonic() - self.started
        self.say(f"ready in {elapsed:.1f} s: " + " · ".join(parts) + " · Ctrl-C stops everything")

    # -- stopping --------------------------------------------------------------------------------

    def _stop_all(self) -> None:
        self.stopping.set()
        if any(state.process.running() for state in self.states):
            self.say("stopping (Ctrl-C again to force)")
        if self.reloads is not None:  # spares, successors, processes being replaced: stopped together, first
            extra = [threading.Thread(target=process.stop, args=(self.force,), daemon=True)
                     for process in self.reloads.stop()]
            for thread in extra:
                thread.start()
            for thread in extra:
                thread.join()
        for stage in (OTHERS, OURS, BROKER):
            members = [state for state in reversed(self.states) if state.stage == stage and state.process.popen]
            threads = [threading.Thread(target=self._stop_one, args=(state,), daemon=True) for state in members]
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                self._pump(0.1)
            for thread in threads:
                thread.join()
        self._pump(0.05)
        watchdog = self.watchdog.pid if self.watchdog is not None else None
        leftovers = [process for process in alive(descendants(os.getpid())) if process.pid != watchdog]
        if leftovers:
            self.say(f"killing {len(leftovers)} leftover process(es): {', '.join(str(p.pid) for p in leftovers)}")
            kill(leftovers)
        reap_orphans({watchdog} if watchdog else set())
        if self.cgroup is not None:
            self.cgroup.leave()
        if self.watchdog is not None:
            self.watchdog.finish()  # it kills what is left of ours anywhere, and removes the cgroup
        self._pump(0.05)
        self.say("stopped")
        with self.feed_lock:
            for subscriber in self.subscribers:
                subscriber.put(None)
        if self.control_server is not None:
            self.control_server.close()
        control.remove_info(self.state_dir)
        self.api_listener.close()
        self.link.close()
        self.log_files.close()

    def _stop_one(self, state: ProcessState) -> None:
        process = state.process
        was_running = process.running()
        started = time.monotonic()
        status = process.stop(self.force)
        state.status = "stopped"
        if was_running:
            self.say_later(f"{process.name} stopped (status {status}, {time.monotonic() - started:.1f} s)")
