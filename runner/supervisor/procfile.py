"""Procfiles: reading one (honcho's parser), the built-in one, and what each line runs.

A line's role (broker, api, worker, beat) is read from its command, for `dify-local serve ROLE`
and for Celery's own `celery … worker|beat`, so the supervisor knows how to probe and stop it and
which queues a worker consumes. Lines of other projects have no role.
"""

from __future__ import annotations

import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path

from honcho.environ import parse_procfile

from runner.roles import ROLES

PROCFILE = "Procfile"
DEFAULT_PROCFILE = """\
broker: dify-local serve broker
api: dify-local serve api
worker: dify-local serve worker
beat: dify-local serve beat
"""
OUR_COMMANDS = ("dify-local",)


class ProcfileError(Exception):
    pass


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    command: str
    role: str | None = None
    queues: tuple[str, ...] | None = None  # a worker's -Q; None means its settings decide
    hostname: str | None = None  # a worker's -n, before %h expansion
    argv: tuple[str, ...] = field(default=(), compare=False)

    @property
    def is_ours(self) -> bool:
        return bool(self.argv) and Path(self.argv[0]).name in OUR_COMMANDS

    def node_name(self) -> str:
        """The Celery node name this worker answers pings as."""
        name = self.hostname or f"{self.name}@%h"
        return name.replace("%h", socket.gethostname()).replace("%n", socket.gethostname().split(".")[0])


def _option(argv: list[str], short: str, long: str) -> str | None:
    for index, item in enumerate(argv):
        if item in (short, long) and index + 1 < len(argv):
            return argv[index + 1]
        if item.startswith(long + "="):
            return item.split("=", 1)[1]
        if short and item.startswith(short) and len(item) > len(short) and not item.startswith("--"):
            return item[len(short):]
    return None


def describe(name: str, command: str) -> ProcessSpec:
    try:
        argv = shlex.split(command)
    except ValueError:
        return ProcessSpec(name, command)
    if not argv:
        return ProcessSpec(name, command)
    program = Path(argv[0]).name
    role = None
    if program in OUR_COMMANDS and "serve" in argv:
        after = argv[argv.index("serve") + 1:]
        role = after[0] if after and after[0] in ROLES else None
    elif program == "celery":
        role = next((item for item in argv[1:] if item in ("worker", "beat")), None)
    queues = hostname = None
    if role == "worker":
        raw = _option(argv, "-Q", "--queues")
        queues = tuple(q.strip() for q in raw.split(",") if q.strip()) if raw else None
        hostname = _option(argv, "-n", "--hostname")
    return ProcessSpec(name, command, role, queues, hostname, tuple(argv))


def load_procfile(project_dir: Path, path: Path | None = None) -> tuple[list[ProcessSpec], str]:
    """The processes of `path` (or the project's Procfile, or the built-in one) and where they came from."""
    if path is None:
        candidate = project_dir / PROCFILE
        if not candidate.exists():
            processes = parse_procfile(DEFAULT_PROCFILE).processes.items()
            return [describe(name, command) for name, command in processes], "the built-in Procfile"
        path = candidate
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ProcfileError(f"cannot read {path}: {error}") from None
    try:
        processes = parse_procfile(text).processes
    except AssertionError:
        raise ProcfileError(f"{path}: process names must be unique") from None
    if not processes:
        raise ProcfileError(f"{path} defines no processes (lines look like `name: command`)")
    return [describe(name, command) for name, command in processes.items()], str(path)
