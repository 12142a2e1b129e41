"""The topology of a project's own Celery app, asked of the app itself.

For a Procfile whose worker or beat line is `celery -A X …` with an app other than ours, the
app is imported by the line's own interpreter (`uv run python`, a virtualenv's python: the app's
libraries are there, not in dify-local's), which runs runner/app_topology_probe.py and prints
JSON: each task and its queue by Celery's router, beat's schedule. Against the Procfile's worker
lines that gives the queues no worker consumes (the bug langgenius/dify#32213 and #35280 shipped).

Bounded: a timeout with progress reports (a Dify app imports for 20 s), the output capped, and a
failed import is one line ending with the last line of its traceback. runner.topology stays the
built-in backend's list; this module is the one place for a foreign app's.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from runner.supervisor.procfile import ProcessSpec

PROBE = Path(__file__).with_name("app_topology_probe.py")
PROBE_TIMEOUT = 120.0  # seconds: a real Dify app imports in about 20 s on a laptop
PROGRESS_EVERY = 5.0  # seconds between "still importing" reports
MAX_OUTPUT = 4 << 20  # bytes of JSON read from the probe; an app has hundreds of tasks, not millions
STDERR_TAIL = 200  # lines of the app's own output kept for an error message
BUILTIN_APPS = ("runner.app", "runner.celery_app")  # our backend through Celery's CLI: runner.topology describes it


_LIVE: set[subprocess.Popen] = set()  # probes running now: killed at exit (a Ctrl-C'd doctor runs one in a thread)


@atexit.register
def _kill_live() -> None:
    for process in list(_LIVE):
        _kill(process)


class AppTopologyError(Exception):
    """The app could not be asked: the message is one line saying what and what to do."""


@dataclass(frozen=True)
class AppTopology:
    app: str
    python: tuple[str, ...]
    tasks: list[dict]  # {"name", "queue", "module"}
    schedule: list[dict]  # {"name", "task", "schedule", "queue", "registered"}
    default_queue: str = "celery"
    declared_queues: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    import_seconds: float = 0.0

    def routed(self) -> dict[str, list[str]]:
        """queue → the tasks sent there (registered tasks, and beat entries naming a task the app lacks)."""
        routed: dict[str, list[str]] = {}
        for task in self.tasks:
            if task["queue"]:
                routed.setdefault(task["queue"], []).append(task["name"])
        for entry in self.schedule:
            if entry["queue"] and entry["task"] not in routed.get(entry["queue"], []):
                routed.setdefault(entry["queue"], []).append(entry["task"])
        return routed

    def queues(self) -> list[str]:
        """Every queue of the app: those tasks go to, then those it declares."""
        return list(dict.fromkeys([*self.routed(), *self.declared_queues]))

    def to_json(self) -> dict:
        return {"app": self.app, "python": " ".join(self.python), "import_seconds": self.import_seconds,
                "default_queue": self.default_queue, "declared_queues": self.declared_queues,
                "tasks": self.tasks, "schedule": self.schedule, "errors": self.errors}


def is_builtin(app: str | None) -> bool:
    return bool(app) and app.split(":")[0].startswith(BUILTIN_APPS)


def celery_lines(specs: Iterable[ProcessSpec]) -> list[ProcessSpec]:
    """The Procfile's worker and beat lines that run a project's own Celery app."""
    return [spec for spec in specs if spec.role in ("worker", "beat") and not spec.is_ours
            and spec.celery_app and not is_builtin(spec.celery_app)]


def app_line(specs: Iterable[ProcessSpec]) -> ProcessSpec | None:
    """The line whose app to import: the first worker's (the one that must consume the routes), else beat's."""
    lines = celery_lines(specs)
    return next((spec for spec in lines if spec.role == "worker"), lines[0] if lines else None)


def runs_our_backend(specs: Iterable[ProcessSpec]) -> bool:
    """Whether any line runs dify-local's own api, worker or beat (ours, or our app through Celery's CLI)."""
    return any((spec.is_ours and spec.role in ("api", "worker", "beat")) or is_builtin(spec.celery_app)
               for spec in specs)


def python_command(spec: ProcessSpec, env: dict[str, str] | None = None) -> tuple[str, ...]:
    """How to run the line's own interpreter. A bare `celery` is the one on PATH: the python beside
    it, or the one its first line names."""
    if spec.python:
        return spec.python
    found = shutil.which("celery", path=(env or os.environ).get("PATH"))
    if found is None:
        return ("python3",)
    beside = Path(found).with_name("python")
    if beside.exists():
        return (str(beside),)
    try:
        with open(found, "rb") as script:
            first = script.readline(512).decode("utf-8", "replace")
    except OSError:
        return ("python3",)
    return tuple(shlex.split(first[2:])) if first.startswith("#!") and first[2:].strip() else ("python3",)


def frozen_free_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (the environment) without what the binary's bootloader added: the project's python is not ours."""
    from runner.frozen import foreign_environment

    return foreign_environment(dict(os.environ if base is None else base))


def probe_environment(settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """What the app is imported with: `base` (the environment; `up` adds the .env files), without the
    binary's bootloader variables, and the broker's address where the stack gives it (an app may read
    CELERY_BROKER_URL as it imports; it connects to nothing)."""
    env = frozen_free_environment(base)
    if settings.uses_embedded_broker:
        env.setdefault("CELERY_BROKER_URL", settings.broker_url)
        env.setdefault("REDIS_URL", settings.embedded_url(0))
    return env


def probe(spec: ProcessSpec, project_dir: Path, timeout: float = PROBE_TIMEOUT,
          progress: Callable[[str], None] | None = None, env: dict[str, str] | None = None,
          cancel: threading.Event | None = None) -> AppTopology:
    """Import `spec`'s app with its own interpreter in `project_dir` and read its topology. `cancel`
    set (the stack stopping) kills the import: nothing `up` started outlives it."""
    if not PROBE.is_file():
        raise AppTopologyError(f"this dify-local has no {PROBE.name} to import {spec.celery_app} with "
                               "(a build without it); run dify-local from its package to read the app's topology")
    env = dict(os.environ if env is None else env)
    python = python_command(spec, env)
    argv = [*python, str(PROBE), str(spec.celery_app)]
    shown = " ".join(python)
    try:
        process = subprocess.Popen(argv, cwd=project_dir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
    except OSError as error:
        raise AppTopologyError(f"cannot run `{python[0]}` to import {spec.celery_app} (the Procfile's {spec.name} "
                               f"line runs it): {error.strerror or error}; install it or fix the line") from None
    _LIVE.add(process)
    out = bytearray()
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)

    def read_out() -> None:
        while chunk := process.stdout.read(65536):
            if len(out) <= MAX_OUTPUT:
                out.extend(chunk[:MAX_OUTPUT + 1 - len(out)])

    def read_err() -> None:
        for raw in process.stderr:
            tail.append(raw[:1000].decode("utf-8", "replace").rstrip())

    readers = [threading.Thread(target=target, daemon=True) for target in (read_out, read_err)]
    for reader in readers:
        reader.start()
    started = time.monotonic()
    next_report = started + PROGRESS_EVERY
    try:
        while process.poll() is None:
            now = time.monotonic()
            if cancel is not None and cancel.is_set():
                raise AppTopologyError(f"importing {spec.celery_app} was cancelled")
            if now - started > timeout:
                _kill(process)
                last = next((line for line in reversed(tail) if line.strip()), "")
                raise AppTopologyError(f"importing {spec.celery_app} with `{shown}` did not finish within "
                                       f"{timeout:g} s" + (f"; its last line: {last}" if last else ""))
            if progress is not None and now >= next_report:
                progress(f"still importing {spec.celery_app} with `{shown}` ({now - started:.0f} s)")
                next_report += PROGRESS_EVERY
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            _kill(process)
        _LIVE.discard(process)
        for reader in readers:
            reader.join(5)
    if len(out) > MAX_OUTPUT:
        raise AppTopologyError(f"{spec.celery_app}'s topology is over {MAX_OUTPUT:,} bytes of JSON: not read "
                               "(an app has hundreds of tasks; this one printed more than its topology)")
    answer = _json_or_none(out)
    if process.returncode != 0 or answer is None or "error" in answer:
        last = (answer or {}).get("error") or next((line for line in reversed(tail) if line.strip()),
                                                     f"exit status {process.returncode}")
        raise AppTopologyError(f"cannot import {spec.celery_app} with `{shown}` in {project_dir}: {last}")
    return AppTopology(app=str(spec.celery_app), python=python, tasks=list(answer.get("tasks") or []),
                       schedule=list(answer.get("schedule") or []),
                       default_queue=str(answer.get("default_queue") or "celery"),
                       declared_queues=list(answer.get("declared_queues") or []),
                       errors=list(answer.get("errors") or []),
                       import_seconds=float(answer.get("import_seconds") or 0.0))


def _kill(process: subprocess.Popen) -> None:
    """The probe and what its launcher started (uv's python): their own session."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:  # not ours to wait on any longer (a D-state import)
        pass


def _json_or_none(raw: bytes) -> dict | None:
    lines = [line for line in bytes(raw).decode("utf-8", "replace").splitlines() if line.strip()]
    try:
        value = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# -- the app against the Procfile's workers --------------------------------------------------------

def worker_queues(spec: ProcessSpec, app: AppTopology) -> tuple[str, ...]:
    """What a worker line consumes: its -Q, else what Celery's worker consumes without one (the
    app's declared queues, or its default queue)."""
    if spec.queues:
        return spec.queues
    return tuple(app.declared_queues) or (app.default_queue,)


def consumers(specs: Iterable[ProcessSpec], app: AppTopology) -> dict[str, list[str]]:
    """queue → the Procfile's worker lines (of this app) that consume it."""
    found: dict[str, list[str]] = {}
    for spec in celery_lines(specs):
        if spec.role == "worker" and spec.celery_app == app.app:
            for queue in worker_queues(spec, app):
                found.setdefault(queue, []).append(spec.name)
    return found


def unconsumed(specs: Iterable[ProcessSpec], app: AppTopology) -> dict[str, list[str]]:
    """queue → its tasks, for every queue the app sends to that no worker line consumes."""
    consumed = consumers(specs, app)
    return {queue: tasks for queue, tasks in app.routed().items() if queue not in consumed}


def unconsumed_lines(specs: Iterable[ProcessSpec], app: AppTopology) -> list[str]:
    """One line per queue no worker consumes, naming its tasks and what to do."""
    return [f"queue {queue!r} has tasks routed to it ({', '.join(tasks)}) but no worker line of the Procfile "
            f"consumes it: its messages wait forever; add it to a worker's -Q"
            for queue, tasks in unconsumed(specs, app).items()]
