"""Every process's lines in a file of its own in the state folder, rotated by size; and reading
them back for `dify-local logs`."""

from __future__ import annotations

import datetime
import heapq
import logging
from pathlib import Path
from typing import Iterator, NamedTuple

from runner import safe_files
from runner.log_handlers import RotatingLogFile
from runner.state import StatePaths

STAMP = "%Y-%m-%dT%H:%M:%S.%f"  # sorts as text, so several files merge by time


class LogLine(NamedTuple):
    time: datetime.datetime
    name: str
    text: str


class StateLogHandler(RotatingLogFile):
    """logging's rotating handler for a log file of the state folder: the file is opened through
    runner.safe_files, never through a link. Its rotations rename and remove names (a link itself,
    never what it points to), so only the open needed replacing. A full disk is said once
    (runner.log_handlers)."""

    def __init__(self, state_root: Path, path: Path, **options):
        self.state_root = state_root
        super().__init__(path, **options)

    def _open(self):
        return safe_files.open_file(self.state_root, Path(self.baseFilename), self.mode, encoding=self.encoding,
                                    errors=self.errors)


class ProcessLogFiles:
    """`<folder>/<name>.log` for each process, rotated at `max_bytes` keeping `backups` old files.
    `folder` is StatePaths.logs (runner.supervisor.manager joins it itself): its parent is the state folder."""

    def __init__(self, folder: Path, max_bytes: int, backups: int):
        self.paths = StatePaths(folder.parent)
        self.max_bytes = max_bytes
        self.backups = backups
        self._handlers: dict[str, logging.Handler] = {}
        safe_files.ensure_folders(self.paths.root, [self.paths.logs])

    def _handler(self, name: str) -> logging.Handler:
        handler = self._handlers.get(name)
        if handler is None:
            handler = StateLogHandler(self.paths.root, self.paths.log_file(name), maxBytes=self.max_bytes,
                                      backupCount=self.backups, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(message)s"))
            self._handlers[name] = handler
        return handler

    def write(self, line: LogLine) -> None:
        record = logging.makeLogRecord({"msg": f"{line.time.strftime(STAMP)} {line.text}", "levelno": logging.INFO})
        self._handler(line.name).handle(record)

    def close(self) -> None:
        for handler in self._handlers.values():
            handler.close()
        self._handlers.clear()


def _parse(name: str, raw: str) -> LogLine | None:
    stamp, _, text = raw.rstrip("\n").partition(" ")
    try:
        return LogLine(datetime.datetime.strptime(stamp, STAMP), name, text)
    except ValueError:
        return None


def _file_lines(paths: StatePaths, name: str) -> list[LogLine]:
    """A process's lines, oldest first, from its current file and the newest rotated one."""
    lines: list[LogLine] = []
    current = paths.log_file(name)
    for path in (current.with_name(current.name + ".1"), current):
        try:
            with safe_files.open_file(paths.root, path, "r", errors="replace") as handle:
                lines.extend(line for line in (_parse(name, raw) for raw in handle) if line)
        except FileNotFoundError:
            continue
    return lines


def logged_names(paths: StatePaths) -> list[str]:
    return sorted(name[: -len(".log")] for name in safe_files.list_folder(paths.root, paths.logs)
                  if name.endswith(".log") and len(name) > len(".log"))


def recent_lines(paths: StatePaths, names: list[str], count: int) -> list[LogLine]:
    """The last `count` lines of these processes together, in time order."""
    merged: Iterator[LogLine] = heapq.merge(*(_file_lines(paths, name) for name in names))
    return list(merged)[-count:] if count else []
