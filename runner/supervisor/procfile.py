"""Procfiles: reading one (honcho's parser), the built-in one, replicas, and what each line runs.

A line's role (broker, api, worker, beat) is read from its command, for `dify-local serve ROLE`
and for Celery's own `celery … worker|beat`, so the supervisor knows how to probe and stop it and
which queues a worker consumes. Celery is recognised however a project starts it: `celery`, a
virtualenv's `bin/celery`, `python -m celery`, and either through `uv run`, `poetry run` or
`pipenv run` (`celery_command` is the one place that reads these). Lines of other projects have no
role.
"""

from __future__ import annotations

import re
import shlex
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

from honcho.environ import expand_processes, parse_procfile

from runner.capped_files import FileTooLarge, read_text_capped
from runner.roles import ROLES

PROCFILE = "Procfile"
DEFAULT_PROCFILE = """\
broker: dify-local serve broker
api: dify-local serve api
worker: dify-local serve worker
beat: dify-local serve beat
"""
OUR_COMMANDS = ("dify-local",)
HONCHO_BASE_PORT = 5000  # honcho's default for $PORT: 5000, +100 per process type, +1 per replica
# Replicas of one process type `up` runs. Each is a process of its own (one of our workers is about
# 60 MB: 64 are 4 GB, a laptop's worth) and costs `up` a pipe and two threads; 100,000 ran the
# machine out of processes and left 16,190 orphans. Beyond the CPU count replicas rarely help:
# a worker's pool (CELERY_WORKER_AMOUNT, or autoscale) is the way to more concurrency.
MAX_REPLICAS = 64
MAX_PROCFILE = 1 << 20  # bytes: a Procfile is a few lines; --procfile /dev/zero must not read until memory ends


class ProcfileError(Exception):
    pass


@dataclass(frozen=True)
class ProcessSpec:
    name: str  # the instance: "worker", or "worker.2" when scaled
    command: str
    role: str | None = None
    queues: tuple[str, ...] | None = None  # a worker's -Q; None means its settings decide
    hostname: str | None = None  # a worker's -n, before %h expansion
    argv: tuple[str, ...] = field(default=(), compare=False)
    process_type: str = ""  # the Procfile name ("worker" for worker.1, worker.2, …)
    env: dict[str, str] = field(default_factory=dict, compare=False)  # honcho's: PORT, HONCHO_PROCESS_NAME
    celery_app: str | None = None  # a Celery line's -A/--app ("app.celery")
    # how this line's own interpreter is run (`uv run python`, `.venv/bin/python`): the project's
    # libraries live there, not in ours. Empty: a bare `celery` on PATH, resolved when needed.
    python: tuple[str, ...] = field(default=(), compare=False)

    @property
    def is_ours(self) -> bool:
        return bool(self.argv) and Path(self.argv[0]).name in OUR_COMMANDS

    def node_name(self) -> str:
        """The Celery node name this worker answers pings as."""
        default = f"{self.name}@%h" if self.is_ours else "celery@%h"
        name = self.hostname or default
        if "@" not in name:  # Celery's reading of `-n host`: the host, under the default name
            name = f"celery@{name}"
        host = socket.gethostname()
        short, _, domain = host.partition(".")
        return name.replace("%h", host).replace("%n", short).replace("%d", domain)


def _option(argv: list[str], short: str, long: str) -> str | None:
    for index, item in enumerate(argv):
        if item in (short, long) and index + 1 < len(argv):
            return argv[index + 1]
        if item.startswith(long + "="):
            return item.split("=", 1)[1]
        if short and item.startswith(short) and len(item) > len(short) and not item.startswith("--"):
            return item[len(short):]
    return None


# Launchers that run a command in the project's environment: `uv run …`, `poetry run …`, `pipenv run …`.
# Their options that take a value, so the command after `run` is found (`uv --directory api run celery`).
LAUNCHERS = ("uv", "poetry", "pipenv")
LAUNCHER_VALUE_OPTIONS = frozenset((
    "--directory", "--project", "--with", "--with-editable", "--with-requirements", "--env-file", "--python", "-p",
    "--group", "--extra", "--package", "--index", "--index-url", "--extra-index-url", "--config-file",
    "--cache-dir", "--no-group", "--only-group", "-C", "-P"))
CELERY_VALUE_OPTIONS = frozenset(("-A", "--app", "-b", "--broker", "--result-backend", "--loader", "--config",
                                  "--workdir", "-Q", "--queues", "-n", "--hostname", "-c", "--concurrency",
                                  "-P", "--pool", "-l", "--loglevel", "-s", "--schedule", "-S", "--scheduler"))


@dataclass(frozen=True)
class CeleryCommand:
    args: tuple[str, ...]  # Celery's own arguments: after `celery` or `-m celery`
    python: tuple[str, ...]  # the interpreter of the same environment, with the launcher in front


def _is_python(program: str) -> bool:
    return re.fullmatch(r"python(\d+(\.\d+)?)?", Path(program).name) is not None


def _after_launcher(argv: list[str]) -> int | None:
    """Where the launched command starts in `uv [opts] run [opts] CMD …`, or None."""
    try:
        run = argv.index("run", 1)
    except ValueError:
        return None
    index = run + 1
    while index < len(argv) and argv[index].startswith("-"):
        index += 2 if argv[index] in LAUNCHER_VALUE_OPTIONS else 1
    return index if index < len(argv) else None


def celery_command(argv: list[str]) -> CeleryCommand | None:
    """Celery's arguments and the interpreter to use, when `argv` runs Celery's CLI in any of the
    forms projects use; None otherwise."""
    prefix: tuple[str, ...] = ()
    if argv and Path(argv[0]).name in LAUNCHERS:
        start = _after_launcher(argv)
        if start is None:
            return None
        prefix, argv = tuple(argv[:start]), argv[start:]
    if not argv:
        return None
    program = argv[0]
    if Path(program).name == "celery":
        if prefix:
            python = (*prefix, "python")
        elif "/" in program:  # a virtualenv's bin/celery: its python sits beside it
            python = (str(Path(program).with_name("python")),)
        else:
            python = ()
        return CeleryCommand(tuple(argv[1:]), python)
    if _is_python(program) and argv[1:3] == ["-m", "celery"]:
        return CeleryCommand(tuple(argv[3:]), (*prefix, program))
    return None


def _subcommand(args: tuple[str, ...]) -> str | None:
    """Celery's subcommand (worker, beat, …): the first word not an option nor an option's value."""
    index = 0
    while index < len(args):
        item = args[index]
        if not item.startswith("-"):
            return item
        index += 2 if item in CELERY_VALUE_OPTIONS else 1
    return None


def running_celery_role(argv: list[str]) -> str | None:
    """worker or beat for a running process's argv that is Celery's CLI (its console script shows as
    `python …/bin/celery …`), else None."""
    if len(argv) > 1 and _is_python(argv[0]) and Path(argv[1]).name == "celery":
        argv = argv[1:]
    celery = celery_command(argv)
    role = _subcommand(celery.args) if celery is not None else None
    return role if role in ("worker", "beat") else None


def describe(name: str, command: str, process_type: str = "") -> ProcessSpec:
    process_type = process_type or name
    try:
        argv = shlex.split(command)
    except ValueError:
        return ProcessSpec(name, command, process_type=process_type)
    if not argv:
        return ProcessSpec(name, command, process_type=process_type)
    program = Path(argv[0]).name
    role = app = None
    python: tuple[str, ...] = ()
    options = argv
    celery = None if program in OUR_COMMANDS else celery_command(argv)
    if program in OUR_COMMANDS and "serve" in argv:
        after = argv[argv.index("serve") + 1:]
        role = after[0] if after and after[0] in ROLES else None
    elif celery is not None:
        options = list(celery.args)
        subcommand = _subcommand(celery.args)
        role = subcommand if subcommand in ("worker", "beat") else None
        app, python = _option(options, "-A", "--app"), celery.python
    queues = hostname = None
    if role == "worker":
        raw = _option(options, "-Q", "--queues")
        queues = tuple(q.strip() for q in raw.split(",") if q.strip()) if raw else None
        hostname = _option(options, "-n", "--hostname")
    return ProcessSpec(name, command, role, queues, hostname, tuple(argv), process_type, celery_app=app,
                       python=python)


HOSTNAME_OPTION = re.compile(r"(-n\s+|--hostname[=\s]+)(\S+)")


def _replica_node(spec: ProcessSpec) -> ProcessSpec:
    """A Celery worker replica with a node name of its own (Celery refuses two alike)."""
    if spec.role != "worker" or (spec.is_ours and spec.hostname is None):
        return spec  # ours default to "<instance name>@%h", distinct already
    if spec.hostname is None:
        command = f"{spec.command} --hostname {spec.name}@%h"
    else:
        base, at, host = spec.hostname.partition("@")
        unique = f"{base}.{spec.name.rsplit('.', 1)[-1]}{at}{host}"
        command = HOSTNAME_OPTION.sub(lambda match: match.group(1) + unique, spec.command, count=1)
    return replace(describe(spec.name, command, spec.process_type), env=spec.env)


def parse_scale(items: tuple[str, ...], known: list[str], at_most: int | None = None) -> dict[str, int]:
    """`worker=3` items (also comma-separated, as honcho's -c takes them) → replicas per process type
    (`at_most` each: `up` runs them all on this machine)."""
    scale: dict[str, int] = {}
    for item in (part.strip() for value in items for part in value.split(",") if part.strip()):
        name, sep, count = item.partition("=")
        count = count.strip()
        # ASCII digits only ("²" is a digit to str.isdigit, not to int), and few enough for int()
        if not sep or not (count.isascii() and count.isdigit()) or (at_most is None and len(count) > 9):
            raise ProcfileError(f"--scale {item!r} is not allowed: NAME=COUNT, e.g. worker=3")
        if name not in known:
            raise ProcfileError(f"--scale {item!r}: no process type {name!r}; the Procfile has: {', '.join(known)}")
        if at_most is not None and (len(count) > 9 or int(count) > at_most):
            raise ProcfileError(f"--scale {item!r} is not allowed: at most {at_most} replicas of a process type "
                                "on one machine (a worker gets more concurrency from its pool: CELERY_WORKER_AMOUNT)")
        scale[name] = int(count)
    return scale


def expand(specs: list[ProcessSpec], scale: dict[str, int], port: int | None = None) -> list[ProcessSpec]:
    """Instances of each process type (honcho's expansion: names, $PORT), replicas made distinct.

    A type that runs once keeps its plain name; replicas are `name.1`, `name.2`, … as in honcho.
    """
    by_type = {spec.process_type: spec for spec in specs}
    counts = {name: scale.get(name, 1) for name in by_type}
    instances = []
    for params in expand_processes({name: spec.command for name, spec in by_type.items()}, concurrency=counts,
                                   port=port if port is not None else HONCHO_BASE_PORT):
        process_type = params.name.rsplit(".", 1)[0]
        name = params.name if counts[process_type] > 1 else process_type
        spec = replace(by_type[process_type], name=name, env=dict(params.env))
        instances.append(_replica_node(spec) if counts[process_type] > 1 else spec)
    return instances


def load_procfile(project_dir: Path, path: Path | None = None) -> tuple[list[ProcessSpec], str]:
    """The processes of `path` (or the project's Procfile, or the built-in one) and where they came from."""
    if path is None:
        candidate = project_dir / PROCFILE
        if not candidate.exists():
            processes = parse_procfile(DEFAULT_PROCFILE).processes.items()
            return [describe(name, command) for name, command in processes], "the built-in Procfile"
        path = candidate
    try:
        text = read_text_capped(path, MAX_PROCFILE, "a Procfile")
    except FileTooLarge as error:
        raise ProcfileError(str(error)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ProcfileError(f"cannot read {path}: {error}") from None
    try:
        processes = parse_procfile(text).processes
    except AssertionError:
        raise ProcfileError(f"{path}: process names must be unique") from None
    if not processes:
        raise ProcfileError(f"{path} defines no processes (lines look like `name: command`)")
    return [describe(name, command) for name, command in processes.items()], str(path)
