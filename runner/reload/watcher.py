"""What `up` watches for code changes, and the watchfiles threads that report them.

By default: the folder of the Procfile and, when it is not installed in a virtualenv, the
`runner` package itself. Never: the state folder, log files, virtualenvs, `.git`, caches, build
output, nor anything `--ignore` names. Those folders are never even walked: each folder that is
watched gets its own watch (inotify's way anyway), so a `.venv` with thousands of folders costs
nothing, where a recursive watch of the project would walk it and filter its events.

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
from typing import Callable

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


def watched_folders(plan: WatchPlan, source_filter: SourceFilter) -> list[Path]:
    """Every folder under the roots that is not left out, walked without entering the left-out ones."""
    folders: list[Path] = []
    for root in plan.roots:
        for current, names, _ in os.walk(root, onerror=lambda error: log.warning(
                "cannot watch %s: %s", error.filename, error.strerror)):
            folder = Path(current)
            folders.append(folder)
            # Hidden folders are left out (.venv, .git, editors' own): a project keeps no code in one.
            names[:] = [name for name in names if not name.startswith(".")
                        and not (folder / name).is_symlink()
                        and not source_filter.ignored(folder / name, folder=True)]
    return folders


class SourceWatcher:
    """A thread running watchfiles over every watched folder, each on its own (not recursively):
    one watcher, so a burst anywhere is one batch. A folder created later is added (the watch is
    set up again). Each batch of changed files goes to `on_change`."""

    def __init__(self, plan: WatchPlan, on_change: Callable[[set[Path]], None]):
        self.plan = plan
        self.on_change = on_change
        self.filter = SourceFilter(plan)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop_event.is_set():
                folders = set(watched_folders(self.plan, self.filter))
                for changes in watch(*folders, watch_filter=self.filter, debounce=DEBOUNCE_MS, step=STEP_MS,
                                     stop_event=self.stop_event, recursive=False, raise_interrupt=False,
                                     ignore_permission_denied=True):
                    paths = {Path(path) for _, path in changes}
                    files = {path for path in paths if not path.is_dir()}
                    new = [path for path in paths if path.is_dir() and path not in folders]
                    if new:  # their files may be written before their watch is set up: count them in
                        files |= self._files_in(new)
                    if files:
                        self.on_change(files)
                    if new:
                        break  # watch the new folders too
                else:
                    return
        except Exception as error:  # the stack keeps running without reload rather than going down
            log.warning("file watching stopped (%s: %s); reload is off until `up` restarts",
                        type(error).__name__, error)

    def _files_in(self, new: list[Path]) -> set[Path]:
        found = set()
        for folder in watched_folders(WatchPlan(tuple(new)), self.filter):
            with os.scandir(folder) as entries:
                found |= {Path(entry.path) for entry in entries
                          if entry.is_file() and self.filter(None, entry.path)}
        return found

    def stop(self) -> None:
        self.stop_event.set()
