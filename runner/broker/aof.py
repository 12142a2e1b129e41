"""The embedded broker's append-only log: every write, in the order it took effect.

The event loop encodes each write as it takes effect, into a `LogBuffer` (compiled in the broker's
read loop where that is built); a writer thread takes what is there every 0.1 s, writes it to the
file, and fsyncs it every second: Redis' `appendfsync
everysec` promise, at most about a second of writes lost if the broker or the machine dies. Doing
the file work off the loop keeps it off every client's round trip. When the file has doubled since
it was last compacted, it is rewritten as the few commands that rebuild the current data.

At start the log is replayed. A tail that is not a whole command (a crash mid-write) or is not a
command at all (corruption) stops the replay there: what came before is restored, the rest is
moved to a file beside the log, and the caller is told, to warn loudly. Nothing is thrown away.
The log holds nothing but RESP arrays of bulk strings, and is read by a strict parser of its own:
a line of text in it is corruption, not an inline command to run.

A write the disk refuses (full, failing) is kept and tried again every 0.1 s, with an error in
the log, rather than dropped; a compaction that cannot be written keeps the full log.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

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
MAX_BULK = 512 * 1024 * 1024  # Redis' proto-max-bulk-len


class Corrupt(Exception):
    """Bytes in the log that are not a command."""

    def __init__(self, offset: int, detail: str):
        super().__init__(detail)
        self.offset = offset


def read_commands(data: bytes) -> Iterator[tuple[list[bytes], int, int]]:
    """(command, start, end) for each whole command in `data`, in order. Stops at an incomplete
    command (a tail cut short); raises `Corrupt` at anything that is not an array of bulk strings."""
    size, find, position = len(data), data.find, 0
    while position < size:
        start = position
        if data[position] != 0x2A:  # "*"
            raise Corrupt(start, f"expected '*', found {data[position:position + 1]!r}")
        end = find(b"\r\n", position)
        if end < 0:
            return
        digits = data[position + 1:end]
        if not digits.isdigit() or int(digits) < 1:
            raise Corrupt(start, f"bad array length {digits[:20]!r}")
        position = end + 2
        command = []
        for _ in range(int(digits)):
            if position >= size:
                return
            if data[position] != 0x24:  # "$"
                raise Corrupt(start, f"expected '$' at byte {position}, found {data[position:position + 1]!r}")
            end = find(b"\r\n", position)
            if end < 0:
                return
            digits = data[position + 1:end]
            if not digits.isdigit() or int(digits) > MAX_BULK:
                raise Corrupt(start, f"bad string length {digits[:20]!r} at byte {position}")
            value_end = end + 2 + int(digits)
            if value_end + 2 > size:
                return
            if data[value_end:value_end + 2] != b"\r\n":
                raise Corrupt(start, f"a string overruns its length at byte {value_end}")
            command.append(data[end + 2:value_end])
            position = value_end + 2
        yield command, start, position


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _sync_folder(folder: Path) -> None:
    """Make a file's creation or renaming in `folder` durable (best effort: not every file system can)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class LoadReport:
    commands: int = 0
    seconds: float = 0.0
    failed: int = 0  # commands the core refused while replaying (logged one by one)
    set_aside: Path | None = None  # where a broken tail was moved
    set_aside_bytes: int = 0
    reason: str = ""


MULTI = pack_command((b"multi",))
EXEC = pack_command((b"exec",))


class LogBuffer:
    """Writes not yet taken by the writer thread, encoded as the file holds them, with the SELECTs
    they need and MULTI/EXEC around a group of several (a transaction's or a script's). The loop
    appends; the writer takes. `_session.LogBuffer` is the same in C, for the compiled read loop
    (which appends to it without a Python call per write); each of its calls holds the GIL
    throughout, which is its lock. This one has a lock of its own."""

    def __init__(self) -> None:
        self.db: int | None = None  # the database the log's next command runs on (None: it states it)
        self._parts: list[bytes] = []
        self._group: list[bytes] | None = None  # a group's writes, kept together
        self._group_writes = 0
        self._lock = threading.Lock()  # the loop's appends against the writer's take

    def append(self, db: int, command: list[bytes]) -> None:
        encoded = pack_command(tuple(command))
        with self._lock:
            target = self._group if self._group is not None else self._parts
            if db != self.db:
                target.append(pack_command((b"select", b"%d" % db)))
                self.db = db
            target.append(encoded)
            self._group_writes += 1

    def begin_group(self) -> None:
        self._group = []
        self._group_writes = 0

    def end_group(self) -> None:
        if self._group is None:
            return
        group, self._group = self._group, None
        if self._group_writes > 1:
            group = [MULTI, *group, EXEC]
        with self._lock:
            self._parts.extend(group)

    def take(self) -> bytes:
        """Everything appended (whole groups only) since the last take, as one piece."""
        with self._lock:
            parts, self._parts = self._parts, []
        return b"".join(parts)

    def clear(self) -> None:
        with self._lock:
            self._parts = []


def log_buffer(compiled: bool) -> "LogBuffer":
    """The compiled LogBuffer where it is built (and the compiled read loop wanted), else LogBuffer."""
    if compiled:
        try:
            from runner.broker._session import LogBuffer as CompiledLogBuffer
        except ImportError:
            pass
        else:
            return CompiledLogBuffer()
    return LogBuffer()


class AppendOnlyLog:
    def __init__(self, folder: Path, rewrite_min_bytes: int = REWRITE_MIN_BYTES, compiled: bool = True):
        self.folder = folder
        self.path = folder / LOG_NAME
        self.rewrite_min_bytes = rewrite_min_bytes
        self.buffer = log_buffer(compiled)  # writes not yet in the file, encoded
        self._unwritten = b""  # encoded writes the disk refused (the writer's alone), tried again first
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
        self._next_rewrite = rewrite_min_bytes  # needs_rewrite's threshold
        self.error = ""  # the last write or fsync the disk refused, until one succeeds again

    # -- start ------------------------------------------------------------------------------------

    def load(self, execute: Callable[[int, list[bytes]], bool]) -> LoadReport:
        """Replay the log through `execute(db, command) -> ok`; cut off and set aside a broken tail."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        report = LoadReport()
        if not self.path.exists():
            return report
        started = time.monotonic()
        data = self.path.read_bytes()
        db = 0
        good = 0  # bytes up to the end of the last command applied (or transaction committed)
        pending: list[tuple[int, list[bytes]]] | None = None  # a MULTI not yet closed by EXEC
        try:
            for command, start, end in read_commands(data):
                name = command[0].lower()
                if name == b"select":
                    if len(command) != 2 or not command[1].isdigit():
                        raise Corrupt(start, "a SELECT without a database number")
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
                    good = end
        except Corrupt as error:
            report.reason = f"bytes that are not a command (at byte {error.offset}: {error})"
        if good < len(data):
            if not report.reason:
                report.reason = ("an unfinished transaction" if pending is not None
                                 else "an incomplete command (a crash while it was written)")
            report.set_aside = self._set_aside(data[good:])
            report.set_aside_bytes = len(data) - good
            with open(self.path, "r+b") as handle:  # only once the tail is safely in its own file
                handle.truncate(good)
                os.fsync(handle.fileno())
        report.seconds = time.monotonic() - started
        return report

    def _set_aside(self, tail: bytes) -> Path:
        """Write a broken tail to a new file beside the log (never over an earlier one), durably."""
        stem = f"{LOG_NAME}.broken-{time.strftime('%Y%m%d-%H%M%S')}"
        for attempt in range(1, 10_000):
            path = self.folder / (stem if attempt == 1 else f"{stem}-{attempt}")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            try:
                _write_all(fd, tail)
                os.fsync(fd)
            finally:
                os.close(fd)
            _sync_folder(self.folder)
            return path
        raise OSError(f"no free name for {stem} in {self.folder}")

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if created:
            _sync_folder(self.folder)
        self.size = self.base_size = os.fstat(self._fd).st_size
        self._next_rewrite = max(self.rewrite_min_bytes, 2 * self.base_size)
        self.buffer.db = None  # the next command states its database
        self._thread = threading.Thread(target=self._writer, name="aof-writer", daemon=True)
        self._thread.start()

    # -- the event loop's side --------------------------------------------------------------------

    def append(self, db: int, command: list[bytes]) -> None:
        self.buffer.append(db, command)

    def begin_group(self) -> None:
        self.buffer.begin_group()

    def end_group(self) -> None:
        self.buffer.end_group()

    def needs_rewrite(self) -> bool:
        """True once the log is rewrite_min_bytes big and has doubled since it was last compacted.

        Asked after every batch. If the compaction then does not happen (a type the snapshot
        cannot write, a full disk), the answer stays False until the log has doubled once more:
        a snapshot of all the data after every batch would bring the broker to a crawl."""
        if self.size < self._next_rewrite:
            return False
        self._next_rewrite = 2 * self.size
        return True

    # -- the writer thread ------------------------------------------------------------------------

    def _writer(self) -> None:
        next_sync = time.monotonic() + FSYNC_INTERVAL
        while not self._stop.wait(WRITE_INTERVAL):
            try:
                self.flush()
                if time.monotonic() >= next_sync:
                    self.sync()
                    next_sync = time.monotonic() + FSYNC_INTERVAL
            except Exception:  # a fault of ours must not end the writes for good
                log.exception("the append-only log's writer failed; trying again")

    def _failed(self, what: str, error: OSError) -> None:
        if not self.error:
            log.error("cannot %s the append-only log %s: %s; the writes are kept in memory and tried again",
                      what, self.path, error.strerror or error)
        self.error = f"{what}: {error.strerror or error}"

    def _recovered(self) -> None:
        if self.error:
            log.warning("the append-only log %s is written again (after: %s)", self.path, self.error)
            self.error = ""

    def flush(self) -> None:
        """Write the buffer's writes to the file (the kernel's). What the disk refuses is kept,
        to be written first next time: the file stays a prefix of the writes, in order."""
        with self._file_lock:
            if self._fd is None:
                return  # closed: nothing is taken (close flushes before)
            data = self.buffer.take()
            if self._unwritten:
                data, self._unwritten = self._unwritten + data, b""
            if not data:
                return
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as error:
                self._unwritten = bytes(view)
                self._failed("write", error)
            else:
                self._recovered()
            written = len(data) - len(view)
            if written:
                self._unsynced = True
                self.size += written

    def sync(self) -> None:
        with self._file_lock:
            if self._fd is not None and self._unsynced:
                try:
                    os.fsync(self._fd)
                except OSError as error:
                    self._failed("fsync", error)
                    return
                self._unsynced = False
                self.last_fsync = time.time()

    # -- compaction ---------------------------------------------------------------------------------

    def rewrite(self, snapshot: list[tuple[int, list[bytes]]]) -> bool:
        """Replace the log by `snapshot` (the commands that rebuild the data now), atomically.

        Writes not yet in the file are in the snapshot already: they are dropped, not written twice.
        If the new file cannot be written, the full log and those writes are kept (False).
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
        fd = None
        try:
            # the new file's descriptor, kept open for the appends after it: it is the log once renamed
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            _write_all(fd, data)
            os.fsync(fd)
            with self._file_lock:
                os.replace(partial, self.path)
                self.buffer.clear()
                self._unwritten = b""
                old, self._fd, fd = self._fd, fd, None
                self._unsynced = False
                previous, self.size = self.size, len(data)
        except OSError as error:
            log.error("cannot compact the append-only log (%s: %s): the full log is kept", partial,
                      error.strerror or error)
            if fd is not None:
                os.close(fd)
                partial.unlink(missing_ok=True)
            return False
        if old is not None:
            try:
                os.close(old)  # the replaced file's (what the writer wrote there is in the snapshot)
            except OSError:
                pass
        _sync_folder(self.folder)
        self.buffer.db = current
        self.base_size = self.size
        self._next_rewrite = max(self.rewrite_min_bytes, 2 * self.base_size)
        self.last_rewrite = time.time()
        self.rewrites += 1
        self._recovered()
        log.info("append-only log compacted: %d → %d bytes (%d commands) in %.2f s", previous, self.size,
                 len(snapshot), time.monotonic() - started)
        return True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.flush()
        self.sync()
        if self._unwritten:
            log.error("%d bytes of writes could not be written to the append-only log %s: they are lost",
                      len(self._unwritten), self.path)
        with self._file_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
