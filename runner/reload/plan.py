"""Which processes a batch of changed files concerns.

Our own roles report the files they have imported, so a changed module concerns exactly the
processes that run it: API-only code the api, task modules the worker, the beat schedule and the
settings code every role that imports them. Files that are not modules (templates, data) concern
the processes that imported a module from the nearest package folder above them. `local_config/`
holds the settings every role of ours reads at start: a change there concerns all of them. A role
that is down because it failed is retried on any change of Python code, so fixing the error that
stopped it starts it again. The broker never restarts on a code change.

Other projects' Celery workers and beats, and `flask run`, run through our bootstrap
(runner/reload/bootstrap.py) and report their imports the same way; `local_config/` is not theirs.
Other processes report nothing (nor these before their first report, nor when `reload` in
local_config/processes.toml names patterns): one restarts when a changed file matches its patterns
(`*.py` unless `reload` says otherwise).

Some files are read by `up` itself (the Procfile, .env files, processes.toml): a change to one is
reported as needing `up` to be restarted, never acted on halfway.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PATTERNS = ("*.py",)


@dataclass(frozen=True)
class Candidate:
    """A process as the plan sees it."""

    name: str
    ours: bool  # it reports its imports (one of our roles, or a line run through the bootstrap)
    imports: frozenset[str] = frozenset()  # real paths of the files it has imported
    down: bool = False  # stopped by a failure: retried on any code change
    patterns: tuple[str, ...] = DEFAULT_PATTERNS  # other processes: what restarts them; () = nothing
    reads_config: bool = True  # our roles read local_config/; another project's processes do not
    folders: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "folders", frozenset(os.path.dirname(path) for path in self.imports))


@dataclass(frozen=True)
class Plan:
    reload: dict[str, list[Path]]  # process name → the changed files that concern it
    read_by_up: list[Path]  # files only a restart of `up` applies


def _package_folder(path: Path, roots: tuple[Path, ...]) -> str | None:
    """The nearest folder above `path` that is a package (holds __init__.py), inside the roots."""
    for folder in path.parents:
        if not any(folder.is_relative_to(root) for root in roots):
            return None
        if (folder / "__init__.py").is_file():
            return str(folder)
    return None


def _matches(path: Path, roots: tuple[Path, ...], patterns: tuple[str, ...]) -> bool:
    root = next((root for root in roots if path.is_relative_to(root)), None)
    relative = path.relative_to(root).as_posix() if root else path.name
    return any(fnmatch.fnmatchcase(relative, pattern) or fnmatch.fnmatchcase(path.name, pattern)
               for pattern in patterns)


def concerns(candidate: Candidate, path: Path, roots: tuple[Path, ...], config_dir: Path) -> bool:
    if not candidate.ours:
        return _matches(path, roots, candidate.patterns)
    if path.is_relative_to(config_dir):
        return candidate.reads_config
    text = str(path)
    if path.suffix == ".py":
        return candidate.down or text in candidate.imports
    package = _package_folder(path, roots)
    return package is not None and package in candidate.folders


def plan_reload(changed: set[Path], candidates: list[Candidate], roots: tuple[Path, ...], config_dir: Path,
                read_by_up: set[Path]) -> Plan:
    reload: dict[str, list[Path]] = {}
    for path in sorted(changed):
        if path in read_by_up:
            continue
        for candidate in candidates:
            if concerns(candidate, path, roots, config_dir):
                reload.setdefault(candidate.name, []).append(path)
    return Plan(reload, sorted(path for path in changed if path in read_by_up))
