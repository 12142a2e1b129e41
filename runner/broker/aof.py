"""The embedded broker's append-only log: every write, in the order it took effect.

The event loop only hands each batch's writes over (one list, one lock); a writer thread encodes
them and writes them to the file every 0.1 s, and fsyncs it every second: Redis' `appendfsync
everysec` promise, at most about a second of writes lost if the broker or the machine dies. Doing
the file work off the loop keeps it off every client's round trip. When the file has doubled since
it was last compacted, it is rewritten as the few commands that rebuild the current data.

At start the log is replayed. A tail that is not a whole command (a crash mid-write) or is not a
command at all (corruption) stops the replay there: what came before is restored, the rest is
moved to a file beside the log, and the caller is told, to warn loudly. Nothing is thrown away.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from runner.broker.resp import CommandReader, ProtocolError

try:  # hiredis packs a command in C, half the time of Python
    from hiredis import pack_command
except ImportError:  # pragma: no cover - hiredis is a dependency; this keeps the log working without it
    from runner.broker.resp import encode_command as _encode

    def pack_command(command: tuple[bytes, ...]) -> bytes:
        return _encode(list(command))

log = logging.getLogger("dify_local.broker")

LOG_NAME = "appendonly.aof"
WRITE_INTERVAL = 0.1  # seconds between writes to the file
FSYNC_INTERVAL = 1.0  # seconds between fsyncs: Redis' everysec
REWRITE_MIN_BYTES = 16 * 1024 * 1024  # compact once the log is this big and has doubled


@dataclass
class LoadReport:
    commands: int = 0
    seconds: float = 0.0
    failed: int = 0  # commands the core refused while replaying (logged one by one)
    set_aside: Path | None = None  # where a broken tail was moved
    set_aside_bytes: int = 0
    reason: str = ""


class AppendOnlyLog:
    def __init__(self, folder: Path, rewrite_min_bytes: int = REWRITE_MIN_BYTES):
        self.folder = folder
        self.path = folder / LOG_NAME
        self.rewrite_min_bytes = rewrite_min_bytes
        self._batch: list[tuple[bytes, ...]] = []  # this batch's writes (the loop's alone)
        self._db: int | None = None  # the database the log's next command runs on
        self._group: list[tuple[bytes, ...]] | None = None  # a MULTI/EXEC or script's writes, kept together
        self._handed: list[tuple[bytes, ...]] = []  # batches handed to the writer, not yet in the file
        self._hand_lock = threading.Lock()
        self._file_lock = threading.Lock()  # the file: writer thread against rewrites and close
        self._fd: int | None = None
        self._unsynced = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.size = 0
        self.base_size = 0  # size after the last rewrite (or load)
        self.last_fsync = 0.0
        self.last_rewrite = 0.0
        self.rewrites = 0

    # -- start ------------------------------------------------------------------------------------

    def load(self, execute: Callable[[int, list[bytes]], bool]) -> LoadReport:
        """Replay the log through `execute(db, command) -> ok`; cut off and set aside a broken tail."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        report = LoadReport()
        if not self.path.exists():
            return report
        started = time.monotonic()
        data = self.path.read_bytes()
        reader = CommandReader()
        reader.feed(data)
        db = 0
        good = 0  # bytes up to the end of the last command applied (or transaction committed)
        pending: list[tuple[int, list[bytes]]] | None = None  # a MULTI not yet closed by EXEC
        try:
            for command in reader:
                name = command[0].lower()
                if name == b"select":
                    db = int(command[1])
                elif name == b"multi":
                    pending = []
                elif name == b"exec":
                    for entry in pending or []:
                        report.commands += 1
                        report.failed += not execute(*entry)
                    pending = None
                elif pending is not None:
                    pending.append((db, command))
                else:
                    report.commands += 1
                    report.failed += not execute(db, command)
                if pending is None:  # inside MULTI the good part still ends before it
                    good = reader.consumed
        except (ProtocolError, ValueError, IndexError) as error:
            report.reason = f"not a command at byte {reader.consumed}: {error}"
        if good < len(data):
            if not report.reason:
                report.reason = ("an unfinished transaction" if pending is not None
                                 else "an incomplete command (a crash while it was written)")
            report.set_aside = self.folder / f"{LOG_NAME}.broken-{time.strftime('%Y%m%d-%H%M%S')}"
            report.set_aside.write_bytes(data[good:])
            report.set_aside_bytes = len(data) - good
            with open(self.path, "r+b") as handle:
                handle.truncate(good)
                os.fsync(handle.fileno())
        report.seconds = time.monotonic() - started
        return report

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.size = self.base_size = os.fstat(self._fd).st_size
        self._db = None  # the next command states its database
        self._thread = threading.Thread(target=self._writer, name="aof-writer", daemon=True)
        self._thread.start()

    # -- the event loop's side --------------------------------------------------------------------

    def append(self, db: int, command: list[bytes]) -> None:
        target = self._group if self._group is not None else self._batch
        if db != self._db:
            target.append((b"select", b"%d" % db))
            self._db = db
        target.append(tuple(command))

    def begin_group(self) -> None:
        self._group = []

    def end_group(self) -> None:
        group, self._group = self._group or [], None
        if sum(1 for entry in group if entry[0] != b"select") > 1:
            group = [(b"multi",), *group, (b"exec",)]
        self._batch.extend(group)

    def write_pending(self) -> None:
        """Hand the batch's writes to the writer thread (end of every batch)."""
        if self._batch:
            batch, self._batch = self._batch, []
            with self._hand_lock:
                self._handed.extend(batch)

    def needs_rewrite(self) -> bool:
        return self.size >= self.rewrite_min_bytes and self.size >= 2 * self.base_size

    # -- the writer thread ------------------------------------------------------------------------

    def _writer(self) -> None:
        next_sync = time.monotonic() + FSYNC_INTERVAL
        while not self._stop.wait(WRITE_INTERVAL):
            self.flush()
            if time.monotonic() >= next_sync:
                self.sync()
                next_sync = time.monotonic() + FSYNC_INTERVAL

    def flush(self) -> None:
        """Write what was handed over to the file (the kernel's)."""
        with self._file_lock:
            with self._hand_lock:
                commands, self._handed = self._handed, []
            if not commands or self._fd is None:
                return
            data = b"".join(map(pack_command, commands))
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            self._unsynced = True
            self.size += len(data)

    def sync(self) -> None:
        with self._file_lock:
            if self._fd is not None and self._unsynced:
                os.fsync(self._fd)
                self._unsynced = False
                self.last_fsync = time.time()

    # -- compaction ---------------------------------------------------------------------------------

    def rewrite(self, snapshot: list[tuple[int, list[bytes]]]) -> None:
        """Replace the log by `snapshot` (the commands that rebuild the data now), atomically.

        Writes not yet in the file are in the snapshot already: they are dropped, not written twice.
        """
        started = time.monotonic()
        partial = self.path.with_suffix(".rewrite")
        chunks, current = [], None
        for db, command in snapshot:
            if db != current:
                chunks.append(pack_command((b"select", b"%d" % db)))
                current = db
            chunks.append(pack_command(tuple(command)))
        data = b"".join(chunks)
        with self._file_lock:
            with self._hand_lock:
                self._handed = []
            self._batch = []
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(partial, self.path)
            if self._fd is not None:
                os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND, 0o600)
            self._unsynced = False
            previous, self.size = self.size, len(data)
        self._db = current
        self.base_size = self.size
        self.last_rewrite = time.time()
        self.rewrites += 1
        log.info("append-only log compacted: %d → %d bytes (%d commands) in %.2f s", previous, self.size,
                 len(snapshot), time.monotonic() - started)

    def close(self) -> None:
        self.write_pending()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.flush()
        self.sync()
        with self._file_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
