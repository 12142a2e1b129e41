"""What `up` watches for code changes, and the watchfiles threads that report them.

By default: the folder of the Procfile and, when it is not installed in a virtualenv, the
`runner` package itself. Never: the state folder, log files, virtualenvs, `.git`, caches, build
output, nor anything `--ignore` names. A folder is watched by setting up an inotify watch on each
of its sub-folders, so a project's top level is watched in two parts: its files (not recursively)
and each of its folders that is not ignored (recursively). A `.venv` with thousands of folders is
then never walked at all, rather than walked and filtered.

watchfiles groups changes until none has arrived for `STEP_MS`, so an editor's save or a `git
checkout` of hundreds of files arrives as one batch.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from watchfiles import DefaultFilter, watch

log = logging.getLogger("dify_local.reload")

STEP_MS = 30  # a batch ends after this long without a change (files of a checkout come ms apart)
DEBOUNCE_MS = 1600  # and is cut after this long even if changes keep coming
IGNORED_DIRS = frozenset(DefaultFilter.ignore_dirs) | {
    ".ruff_cache", ".eggs", ".nox", "htmlcov", ".dify-local", "venv", "site-packages"}
IGNORED_TOP_DIRS = frozenset({"build", "dist"})  # build output, at a watched folder's top only
IGNORED_SUFFIXES = (".egg-info", ".dist-info")


@dataclass(frozen=True)
class WatchPlan:
    roots: tuple[Path, ...]  # watched folders, resolved
    ignore: tuple[str, ...] = ()  # globs from --ignore
    excluded: tuple[Path, ...] = ()  # the state folder, log files

    def describe(self) -> str:
        return ", ".join(str(root) for root in self.roots)


def package_folder() -> Path | None:
    """The `runner` package when its source can be edited: not frozen, not inside a virtualenv."""
    if getattr(sys, "frozen", False):
        return None
    folder = Path(__file__).resolve().parent.parent
    return None if in_virtualenv(folder) else folder


@functools.lru_cache(maxsize=4096)
def _is_virtualenv(folder: Path) -> bool:
    return (folder / "pyvenv.cfg").is_file()


def in_virtualenv(path: Path) -> bool:
    return any(_is_virtualenv(folder) for folder in (path, *path.parents))


def default_roots(project_dir: Path, ours: bool) -> list[Path]:
    """The Procfile's folder, and our own package when the Procfile runs our roles."""
    roots = [project_dir.resolve()]
    package = package_folder() if ours else None
    if package is not None and not any(package.is_relative_to(root) for root in roots):
        roots.append(package)
    return roots


class SourceFilter(DefaultFilter):
    """watchfiles' default filter (caches, editors' swap files, .pyc) plus ours."""

    def __init__(self, plan: WatchPlan):
        super().__init__()
        self.plan = plan
        self._excluded = tuple(str(path) for path in plan.excluded)

    def __call__(self, change, path: str) -> bool:
        return super().__call__(change, path) and not self.ignored(Path(path))

    def ignored(self, path: Path, folder: bool = False) -> bool:
        """Whether a file (or with `folder`, a folder) is left out."""
        if str(path).startswith(self._excluded):
            return True
        root = next((root for root in self.plan.roots if path.is_relative_to(root)), None)
        if root is None:
            return True
        relative = path.relative_to(root)
        parts = relative.parts
        if not parts:
            return False
        if parts[0] in IGNORED_TOP_DIRS and len(parts) > (0 if folder else 1):
            return True
        if any(part in IGNORED_DIRS or part.endswith(IGNORED_SUFFIXES) for part in parts):
            return True
        text = relative.as_posix()
        if any(fnmatch.fnmatchcase(text, glob) or any(fnmatch.fnmatchcase(part, glob) for part in parts)
               for glob in self.plan.ignore):
            return True
        return in_virtualenv(path if folder else path.parent)


def watch_targets(plan: WatchPlan, source_filter: SourceFilter) -> tuple[list[Path], list[Path]]:
    """(folders watched recursively, folders watched for their own entries only)."""
    recursive: list[Path] = []
    shallow: list[Path] = []
    for root in plan.roots:
        shallow.append(root)
        try:
            entries = list(os.scandir(root))
        except OSError as error:
            log.warning("cannot watch %s: %s", root, error.strerror)
            continue
        for entry in entries:
            path = Path(entry.path)
            # Hidden folders are left out (.venv, .git, editors' own): a project keeps no code in one.
            if entry.is_dir(follow_symlinks=False) and not path.name.startswith(".") \
                    and not source_filter.ignored(path, folder=True):
                recursive.append(path)
    return recursive, shallow


class SourceWatcher:
    """Threads running watchfiles; each batch of changed paths goes to `on_change`."""

    def __init__(self, plan: WatchPlan, on_change: Callable[[set[Path]], None]):
        self.plan = plan
        self.on_change = on_change
        self.filter = SourceFilter(plan)
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        recursive, shallow = watch_targets(self.plan, self.filter)
        for paths, deep in ((recursive, True), (shallow, False)):
            if paths:
                thread = threading.Thread(target=self._run, args=(paths, deep), daemon=True,
                                          name="watch-" + ("tree" if deep else "top"))
                thread.start()
                self.threads.append(thread)

    def _run(self, paths: Iterable[Path], deep: bool) -> None:
        try:
            for changes in watch(*paths, watch_filter=self.filter, debounce=DEBOUNCE_MS, step=STEP_MS,
                                 stop_event=self.stop_event, recursive=deep, raise_interrupt=False,
                                 ignore_permission_denied=True):
                self.on_change({Path(path) for _, path in changes})
        except Exception as error:  # the stack keeps running without reload rather than going down
            log.warning("file watching stopped (%s: %s); reload is off until `up` restarts",
                        type(error).__name__, error)

    def stop(self) -> None:
        self.stop_event.set()
