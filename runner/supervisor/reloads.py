"""Hot reload, the supervisor's part: from a batch of changed files to new processes serving.

A process of ours is replaced by a *takeover*: its successor loads the new code while the old one
keeps serving; only once it has loaded does the old one step aside. A worker's old process is then
asked for a warm shutdown (it stops consuming at once, finishes its running tasks and returns the
prefetched ones to their queue) and its successor starts consuming without waiting for it: no task
sent after the reload runs the old code, and none waits for the old tasks to finish. The API and
beat must not overlap at all (a port, beat's schedule): their successor serves once the old process
has exited. If the successor fails to load, it exits, its error is shown with file and line, and the
old process never noticed. Nothing retries until the next change.

The successor is usually a *spare*: a process started in advance that has imported the libraries
the last one used (most of a start-up) and waits to be told to load. A spare that imported one of
the changed files is discarded and a fresh process is started instead. Spares cost the memory of
a process each, so one is kept only for a process that has been reloaded once: a stack that is
only run stays as small as it was, and editing is fast from the second save on.

Another project's Celery worker or beat (`celery -A app worker …`, also through `uv run` or
`python -m celery`) is run through our bootstrap (runner/reload/foreign.py, bootstrap.py) in its own
interpreter and is replaced the same way, a worker with a spare kept from its first start: its
libraries (Flask extensions, SQLAlchemy, pydantic …) are most of its start-up, and the first save
is the one a developer waits on too. `flask run` through the bootstrap only reports its imports.
Other projects' processes are restarted (stopped, then started) when a change concerns them.
Everything here runs on the supervisor's loop thread, as the rest of its state changes do.
"""

from __future__ import annotations

import datetime
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from honcho.printer import Message

from runner.process_env import HANDOVER, STANDBY
from runner.reload import foreign
from runner.reload.plan import DEFAULT_PATTERNS, Candidate, plan_reload
from runner.reload.watcher import SourceWatcher, WatchPlan
from runner.supervisor.process import Exited, ManagedProcess, Said
from runner.supervisor.tree import memory_of

if TYPE_CHECKING:
    from runner.supervisor.manager import ProcessState, Supervisor

RELOADED_ROLES = ("api", "worker", "beat")  # our roles that speak the channel; never the broker
SPARE_ROLES = ("api", "worker")  # the reloads a developer waits on: kept a spare
STOP_FIRST_ROLES = ("api", "beat")  # a port, a schedule: the old one has exited before the new one serves
SPARE_DELAY = 1.0  # seconds after a process serves before its spare starts: start-up is busy enough
FILES_SHOWN = 3
TRACEBACK_PLACE = re.compile(r'File "([^"]+)", line (\d+)')


@dataclass
class Batch:
    """The processes one batch of changes reloads, for the one line that reports it."""

    files: list[Path]
    started: float
    waiting: set[str]
    took: dict[str, float] = field(default_factory=dict)


@dataclass
class Takeover:
    state: ProcessState
    incoming: ManagedProcess | None  # None while another project's process is stopped first
    batch: Batch
    old_pid: int | None
    phase: str = "loading"  # loading → releasing (stop-first roles) → serving-soon
    failure: dict | None = None


@dataclass
class Spare:
    process: ManagedProcess
    ready: bool = False
    files: frozenset[str] = frozenset()


class Reloads:
    def __init__(self, supervisor: Supervisor, plan: WatchPlan, read_by_up: set[Path]):
        self.supervisor = supervisor
        self.plan = plan
        self.read_by_up = read_by_up
        self.config_dir = supervisor.settings.project_dir.resolve() / "local_config"
        self.watcher = SourceWatcher(plan, self._changed_from_thread)
        self.changed: set[Path] = set()
        self.due: float | None = None
        self.imports: dict[str, frozenset[str]] = {}
        self.modules: dict[str, list[str]] = {}
        self.loaded_pids: set[int] = set()
        self.takeovers: dict[str, Takeover] = {}
        self.pending: dict[str, set[Path]] = {}
        self.spares: dict[str, Spare] = {}
        self.spare_due: dict[str, float] = {}
        self.retiring: dict[int, ManagedProcess] = {}
        self.edited: set[str] = set()  # processes reloaded at least once: they are kept a spare

    # -- set-up and the watcher's thread ----------------------------------------------------------

    @staticmethod
    def speaks_channel(state_or_spec) -> bool:
        """It reports its imports over a channel (our roles, lines run through the bootstrap)."""
        spec = getattr(state_or_spec, "spec", state_or_spec)
        return (spec.is_ours and spec.role in RELOADED_ROLES) or foreign.mode(spec) is not None

    @staticmethod
    def takes_over(state_or_spec) -> bool:
        """It is replaced by a successor that loads while it serves (else: stopped, then started)."""
        spec = getattr(state_or_spec, "spec", state_or_spec)
        return (spec.is_ours and spec.role in RELOADED_ROLES) or foreign.mode(spec) == "takeover"

    def start(self) -> None:
        self.watcher.start()

    def _changed_from_thread(self, paths: set[Path]) -> None:
        self.supervisor.events.put(Message("changes", paths, datetime.datetime.now(), "system", None))

    # -- what the loop asks -------------------------------------------------------------------------

    def pids(self) -> set[int]:
        extra = [spare.process for spare in self.spares.values()]
        extra += [takeover.incoming for takeover in self.takeovers.values() if takeover.incoming]
        extra += list(self.retiring.values())
        return {process.pid for process in extra if process.pid}

    def busy(self, state: ProcessState) -> bool:
        return state.name in self.takeovers

    def next_due(self) -> list[float]:
        return [moment for moment in (self.due, *self.spare_due.values()) if moment is not None]

    def tick(self, now: float) -> None:
        if self.due is not None and now >= self.due:
            changed, self.changed, self.due = self.changed, set(), None
            self._act(changed)
        for name, moment in list(self.spare_due.items()):
            if now >= moment:
                self._start_spare(name)

    # -- messages -----------------------------------------------------------------------------------

    def changes(self, paths: set[Path]) -> None:
        self.changed |= paths
        if self.due is None:
            self.due = time.monotonic()  # the loop acts on it after draining its queue

    def said(self, state: ProcessState, said: Said) -> None:
        event = said.message["event"]
        spare = self.spares.get(state.name)
        takeover = self.takeovers.get(state.name)
        if spare is not None and spare.process.pid == said.pid:
            if event == "standby":
                spare.ready = True
                spare.files = frozenset(said.message.get("files", []))
            return
        if event in ("loaded", "imports") and said.pid in (state.process.pid, takeover and takeover.incoming
                                                            and takeover.incoming.pid):
            self.imports[state.name] = frozenset(said.message.get("files", []))
            self.modules[state.name] = list(said.message.get("modules", []))
            if event == "loaded":
                self.loaded_pids.add(said.pid)
        if takeover is None or takeover.incoming is None or takeover.incoming.pid != said.pid:
            if event == "failed" and said.pid == state.process.pid:
                state.failure = said.message
            return
        if event == "loaded":
            self._loaded(takeover)
        elif event == "serving":
            self._serving(takeover)
        elif event == "failed":
            takeover.failure = said.message

    def exited(self, state: ProcessState, exited: Exited) -> bool:
        """True if this exit is part of a reload (the supervisor's crash handling must not see it)."""
        if exited.pid in self.retiring:
            return True  # `retired` follows, from the thread that stopped it
        spare = self.spares.get(state.name)
        if spare is not None and spare.process.pid == exited.pid:
            del self.spares[state.name]  # not replaced until the next change: no start-up loop
            return True
        takeover = self.takeovers.get(state.name)
        if takeover is None:
            return exited.pid != state.process.pid  # a dropped spare or the like: nothing to do
        if takeover.incoming is not None and takeover.incoming.pid == exited.pid:
            self._failed(takeover, exited)
            return True
        if takeover.incoming is None:  # another project's process, restarted, crashed: the usual handling
            if exited.pid == state.process.pid and takeover.phase == "serving-soon":
                del self.takeovers[state.name]
                takeover.batch.waiting.discard(state.name)
            return False
        return True  # the old process died while its successor loads: the successor takes over

    def broken_code(self, state: ProcessState, exited: Exited) -> bool:
        """A process of ours that exited before it loaded, over its code: it waits for a fix
        rather than crash-looping."""
        if not self.takes_over(state.process) or exited.pid in self.loaded_pids or exited.returncode < 0:
            return False  # not ours, or it had loaded, or a signal stopped it: the usual crash handling
        failure = state.failure or self._failure_from_tail(state.process)
        if failure.get("user_must_fix"):  # a corrupt database, a link in the state folder: said once, not retried
            state.status = "failed"
            message = failure.get("error") or "it exited before it had loaded"
            self.supervisor.say(f"{state.name} cannot start: {message.partition(': ')[2] or message} "
                                f"(marked failed; `dify-local start {state.name}` once that is fixed)")
            return True
        if failure.get("code") is False:
            return False
        state.status = "failed"
        self.supervisor.say(f"{state.name} cannot start: {self._where(failure)}. It starts again when a saved change "
                            "fixes it.")
        return True

    def on_ready(self, state: ProcessState) -> None:
        """The current process became ready (first start, or a restart)."""
        takeover = self.takeovers.get(state.name)
        if takeover is not None and takeover.incoming is None:  # another project's process, restarted
            self._finish(takeover)
        self._schedule_spare(state)
        if state.name in self.pending and state.name not in self.takeovers:
            self._act(self.pending.pop(state.name), only=state.name)

    def retired(self, state: ProcessState, pid: int) -> None:
        self.retiring.pop(pid, None)
        takeover = self.takeovers.get(state.name)
        if takeover is None or takeover.old_pid != pid or takeover.phase != "releasing":
            return
        takeover.phase = "serving-soon"
        if takeover.incoming is None:  # another project's process: start it again
            self.supervisor._start(state, quiet=True)
            return
        state.process = takeover.incoming
        state.status = "reloading"
        takeover.incoming.tell("serve")

    # -- acting on changes --------------------------------------------------------------------------

    def _candidates(self) -> list[Candidate]:
        candidates = []
        for state in self.supervisor.states:
            role = state.process.spec.role
            if role == "broker" or state.status in ("stopped", "stopping", "pending"):
                continue
            spec, patterns = state.process.spec, state.process.options.reload
            imports = self.imports.get(state.name)
            if spec.is_ours and self.speaks_channel(spec):
                candidates.append(Candidate(state.name, True, imports or frozenset(),
                                            down=state.status in ("failed", "backoff")))
            elif self.speaks_channel(spec) and patterns is None and (imports or state.status == "failed"):
                # another project's line that reported its imports (until then: by pattern, below)
                candidates.append(Candidate(state.name, True, imports or frozenset(), down=state.status == "failed",
                                            reads_config=False))
            else:
                candidates.append(Candidate(state.name, False, patterns=DEFAULT_PATTERNS if patterns is None
                                            else tuple(patterns)))
        return candidates

    def _act(self, changed: set[Path], only: str | None = None) -> None:
        """Reload what `changed` concerns (`only` one process: changes it had to wait for)."""
        if self.supervisor.stopping.is_set():
            return
        candidates = [candidate for candidate in self._candidates() if only in (None, candidate.name)]
        plan = plan_reload(changed, candidates, self.plan.roots, self.config_dir, self.read_by_up)
        for path in plan.read_by_up:
            self.supervisor.say(f"{self._show(path)} changed: `up` reads it at start, so restart `up` to apply it")
        texts = {str(path) for path in changed}
        for name, spare in list(self.spares.items()):
            # A spare that imported a changed file would run stale code; one still importing its
            # libraries is not worth waiting for when its process is to be replaced now.
            if spare.files & texts or (not spare.ready and name in plan.reload):
                self._drop_spare(name)
        if not plan.reload:
            return
        batch = Batch(sorted({path for files in plan.reload.values() for path in files}), time.monotonic(),
                      set(plan.reload))
        for name, files in plan.reload.items():
            state = self.supervisor._state(name)
            if state is None:
                continue
            if name in self.takeovers or state.status in ("starting", "restarting", "reloading"):
                self.pending.setdefault(name, set()).update(files)
                batch.waiting.discard(name)
                continue
            self._begin(state, batch)

    def _begin(self, state: ProcessState, batch: Batch) -> None:
        process = state.process
        old_pid = process.pid if process.running() else None
        self.edited.add(state.name)
        if not self.takes_over(process):
            takeover = Takeover(state, None, batch, old_pid, phase="releasing")
            self.takeovers[state.name] = takeover
            if old_pid is None:
                takeover.phase = "serving-soon"
                self.supervisor._start(state, quiet=True)
            else:
                state.status = "reloading"
                self._retire(state, process)
            return
        self.spare_due.pop(state.name, None)
        if state.status == "backoff":  # crashed, due to restart: the successor is that restart
            state.status, state.restart_at = "reloading", None
        spare = self.spares.pop(state.name, None)
        if spare is not None and spare.ready and spare.process.tell("load"):
            incoming = spare.process
        else:
            if spare is not None:
                self._stop_quietly(spare.process)
            incoming = process.twin()
            try:
                incoming.start({HANDOVER: "1"})
            except OSError as error:
                self.supervisor.say(f"{state.name}: cannot start its successor: {error.strerror or error}")
                batch.waiting.discard(state.name)
                return
        self.takeovers[state.name] = Takeover(state, incoming, batch, old_pid)

    def _loaded(self, takeover: Takeover) -> None:
        state = takeover.state
        old_running = takeover.old_pid is not None and state.process.running()
        if state.process.spec.role in STOP_FIRST_ROLES and old_running:
            takeover.phase = "releasing"
            state.status = "reloading"
            self._retire(state, state.process)
            return
        takeover.phase = "serving-soon"
        if old_running:  # a worker: the old one stops consuming now, the successor starts
            self._retire(state, state.process)
        state.process = takeover.incoming
        state.status = "reloading"
        takeover.incoming.tell("serve")

    def _serving(self, takeover: Takeover) -> None:
        state = takeover.state
        state.process = takeover.incoming
        state.status = "ready"
        state.ever_ready = True
        state.crashes.clear()
        self._finish(takeover)
        self._schedule_spare(state)

    def _failed(self, takeover: Takeover, exited: Exited) -> None:
        state = takeover.state
        del self.takeovers[state.name]
        takeover.batch.waiting.discard(state.name)
        if exited.pid in self.loaded_pids:  # its code loaded: a crash like any other, restarted with backoff
            state.last_exit = exited.returncode
            state.status = "ready"
            self.supervisor._on_exit(state, exited)
            self._report_batch(takeover.batch)
            return
        failure = takeover.failure or self._failure_from_tail(takeover.incoming)
        if state.process is takeover.incoming:  # it was already the process (nothing else serves)
            state.last_exit = exited.returncode
            state.status = "failed"
            tail = "it starts again when a saved change fixes it"
        else:
            tail = f"the previous {state.name} (pid {state.process.pid}) keeps serving; save a fix to reload"
        self.supervisor.say(f"{state.name} not reloaded: {self._where(failure)}; {tail}")
        self._report_batch(takeover.batch)
        self._schedule_spare(state)
        self._continue_pending(state)

    def _finish(self, takeover: Takeover) -> None:
        state = takeover.state
        self.takeovers.pop(state.name, None)
        batch = takeover.batch
        if state.name in batch.waiting:
            batch.waiting.discard(state.name)
            batch.took[state.name] = time.monotonic() - batch.started
        self._report_batch(batch)
        state.restarts += 1
        self._continue_pending(state)

    def _continue_pending(self, state: ProcessState) -> None:
        files = self.pending.pop(state.name, None)
        if files:
            self._act(files, only=state.name)

    def _report_batch(self, batch: Batch) -> None:
        if batch.waiting or not batch.took:
            return
        names = list(batch.took)
        if len(names) == 1:
            what = f"{names[0]} in {batch.took[names[0]]:.2f} s"
        else:
            what = ", ".join(f"{name} {took:.2f} s" for name, took in batch.took.items())
        shown = ", ".join(self._show(path) for path in batch.files[:FILES_SHOWN])
        more = len(batch.files) - FILES_SHOWN
        if more > 0:
            shown += f" and {more} more"
        batch.took = {}
        self.supervisor.say(f"reloaded {what} — {shown}")

    # -- spares and stopping ------------------------------------------------------------------------

    def _schedule_spare(self, state: ProcessState) -> None:
        spec = state.process.spec
        if spec.is_ours:
            wanted = spec.role in SPARE_ROLES and self.speaks_channel(spec) and state.name in self.edited
        else:  # another project's worker: its start-up is long, kept warm from the start (ps shows its memory)
            wanted = spec.role == "worker" and self.takes_over(spec)
        if wanted and state.name not in self.spares:
            self.spare_due[state.name] = time.monotonic() + SPARE_DELAY

    def _start_spare(self, name: str) -> None:
        self.spare_due.pop(name, None)
        state = self.supervisor._state(name)
        if state is None or name in self.spares or name in self.takeovers or state.status != "ready" \
                or self.supervisor.stopping.is_set():
            return
        modules = self.modules.get(name)
        if modules is None:  # not reported yet: try again shortly
            self.spare_due[name] = time.monotonic() + SPARE_DELAY
            return
        spare = Spare(state.process.twin())
        try:
            spare.process.start({STANDBY: "1", HANDOVER: "1"})
        except OSError:
            return
        spare.process.tell("preload", modules=modules)
        self.spares[name] = spare

    def _drop_spare(self, name: str) -> None:
        spare = self.spares.pop(name, None)
        if spare is not None:
            self._stop_quietly(spare.process)

    def _stop_quietly(self, process: ManagedProcess) -> None:
        threading.Thread(target=process.stop, name=f"stop-spare-{process.name}", daemon=True).start()

    def _retire(self, state: ProcessState, process: ManagedProcess) -> None:
        """Stop a process that is being replaced, off the loop; `retired` follows."""
        pid = process.pid
        self.retiring[pid] = process
        supervisor = self.supervisor

        def work() -> None:
            process.stop(supervisor.force)
            supervisor.events.put(Message("retired", pid, datetime.datetime.now(), state.name, None))

        threading.Thread(target=work, name=f"retire-{state.name}", daemon=True).start()

    def forget(self, state: ProcessState) -> None:
        """The process was stopped from the control socket: no spare, no pending reload for it."""
        self._drop_spare(state.name)
        self.spare_due.pop(state.name, None)
        self.pending.pop(state.name, None)

    def describe(self) -> dict:
        """For `ps`: what is watched, and the spares kept (each a process's worth of memory)."""
        return {"watching": [str(root) for root in self.plan.roots],
                "spares": [{"name": name, "pid": spare.process.pid, "ready": spare.ready,
                            "memory": memory_of(spare.process.pid) if spare.process.pid else None}
                           for name, spare in self.spares.items()]}

    def stop(self) -> list[ManagedProcess]:
        """Stop watching; the processes the supervisor must stop besides the current ones."""
        self.watcher.stop()
        self.spare_due.clear()
        extra = [spare.process for spare in self.spares.values()]
        extra += [takeover.incoming for takeover in self.takeovers.values()
                  if takeover.incoming is not None and takeover.incoming is not takeover.state.process]
        extra += list(self.retiring.values())
        self.spares.clear()
        return extra

    # -- wording ------------------------------------------------------------------------------------

    def _show(self, path: Path) -> str:
        """A path as a person reads it: from the project folder, or from the package's parent
        (runner/tasks/mail.py) for a watched package elsewhere."""
        project = self.supervisor.settings.project_dir.resolve()
        if path.is_relative_to(project):
            return path.relative_to(project).as_posix()
        root = next((root for root in self.plan.roots if path.is_relative_to(root)), None)
        return path.relative_to(root.parent).as_posix() if root is not None else str(path)

    def _where(self, failure: dict) -> str:
        place = ""
        if failure.get("file"):
            place = self._show(Path(failure["file"]).resolve())
            if failure.get("line"):
                place += f":{failure['line']}"
            place += ": "
        return place + (failure.get("error") or "it exited before it had loaded")

    @staticmethod
    def _failure_from_tail(process: ManagedProcess | None) -> dict:
        """For a process that died before it could say why: the last traceback place and line."""
        lines = [line.strip() for line in (process.tail if process else []) if line.strip()]
        places = [TRACEBACK_PLACE.search(line) for line in lines]
        places = [match for match in places if match]
        error = lines[-1] if lines else None
        if not places:
            return {"error": error}
        return {"file": places[-1].group(1), "line": int(places[-1].group(2)), "error": error}
