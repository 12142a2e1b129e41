"""Every process's lines in a file of its own in the state folder, rotated by size; and reading
them back for `dify-local logs`."""

from __future__ import annotations

import datetime
import heapq
import logging
import logging.handlers
from pathlib import Path
from typing import Iterator, NamedTuple

STAMP = "%Y-%m-%dT%H:%M:%S.%f"  # sorts as text, so several files merge by time


class LogLine(NamedTuple):
    time: datetime.datetime
    name: str
    text: str


class ProcessLogFiles:
    """`<folder>/<name>.log` for each process, rotated at `max_bytes` keeping `backups` old files."""

    def __init__(self, folder: Path, max_bytes: int, backups: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.backups = backups
        self._handlers: dict[str, logging.Handler] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def _handler(self, name: str) -> logging.Handler:
        handler = self._handlers.get(name)
        if handler is None:
            handler = logging.handlers.RotatingFileHandler(
                self.folder / f"{name}.log", maxBytes=self.max_bytes, backupCount=self.backups, encoding="utf-8")
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


def _file_lines(folder: Path, name: str) -> list[LogLine]:
    """A process's lines, oldest first, from its current file and the newest rotated one."""
    lines: list[LogLine] = []
    for path in (folder / f"{name}.log.1", folder / f"{name}.log"):
        try:
            with path.open(encoding="utf-8", errors="replace") as handle:
                lines.extend(line for line in (_parse(name, raw) for raw in handle) if line)
        except FileNotFoundError:
            continue
    return lines


def logged_names(folder: Path) -> list[str]:
    return sorted(path.name[: -len(".log")] for path in folder.glob("*.log"))


def recent_lines(folder: Path, names: list[str], count: int) -> list[LogLine]:
    """The last `count` lines of these processes together, in time order."""
    merged: Iterator[LogLine] = heapq.merge(*(_file_lines(folder, name) for name in names))
    return list(merged)[-count:] if count else []
