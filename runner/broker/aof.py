"""The embedded broker's append-only log: every write, in the order it took effect.

The event loop encodes each write as it takes effect, into a `LogBuffer` (compiled in the broker's
read loop where that is built), and at the end of each batch of commands, before the batch's
replies go out, writes what is there to the file with one write(2): Redis' model (beforeSleep).
A reply is sent only once its write is in the file, so kill -9 of the broker loses nothing it
acknowledged. A thread fsyncs the file every second, off the loop: Redis' `appendfsync
everysec`, at most about a second of acknowledged writes lost if the machine itself dies. When the
file has doubled since it was last compacted, it is rewritten as the few commands that rebuild the
current data.

At start the log is replayed. A tail that is not a whole command (a crash mid-write) or is not a
command at all (corruption) stops the replay there: what came before is restored, the rest is
moved to a file beside the log, and the caller is told, to warn loudly. Nothing is thrown away.
The log holds nothing but RESP arrays of bulk strings, and is read by a strict parser of its own:
a line of text in it is corruption, not an inline command to run.

A write the disk refuses (full, failing) is kept in the buffer, first, and tried again: the file
stays a prefix of the writes, in order (the server holds back the replies waiting on it, and
refuses further writes, until it is written). A compaction that cannot be written keeps the full
log.

Every file here is opened in the folder's descriptor, never through a symbolic link (O_NOFOLLOW;
new files O_CREAT|O_EXCL): a link planted at the log's name would otherwise have the broker
truncate or append to whatever file it points at. Such a path is refused with `LogRefused`.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
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
REWRITE_NAME = "appendonly.rewrite"  # the compacted log while it is written, renamed over LOG_NAME
BROKEN_NAME = LOG_NAME + ".broken-"  # a broken tail set aside at start (+ the time)
FSYNC_INTERVAL = 1.0  # seconds between fsyncs: Redis' everysec
NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
REWRITE_MIN_BYTES = 16 * 1024 * 1024  # compact once the log is this big and has doubled
MAX_BULK = 512 * 1024 * 1024  # Redis' proto-max-bulk-len


class LogRefused(Exception):
    """A path of the log's that the broker will not use (a symbolic link, a folder): the message
    names it and says what to do."""


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


def _read_all(fd: int) -> bytes:
    with open(fd, "rb", buffering=0, closefd=False) as file:
        return file.readall()


def _link_refusal(path: Path, folder: bool = False) -> str:
    return (f"{path} is a symbolic link: the broker never follows links in its state folder (it would "
            "write to the file the link points at); remove the link, and the broker makes its own "
            f"{'folder' if folder else 'file'} there")


def _refusal(path: Path, error: OSError, folder: bool = False) -> str:
    """One line on a path of the log's that cannot be opened as what it must be, and what to do."""
    try:
        link = stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        link = False
    if link or error.errno == errno.ELOOP:  # (Linux says ENOTDIR for a link opened O_DIRECTORY|O_NOFOLLOW)
        return _link_refusal(path, folder)
    if folder and error.errno == errno.ENOTDIR:
        return f"{path} is not a folder: move it away, and the broker makes its own folder there"
    if error.errno == errno.EISDIR:
        return f"{path} is a folder, not the broker's file: move it away, and the broker makes its own file there"
    return f"cannot open {path}: {error.strerror or error}"


def _plain_file(fd: int, path: Path) -> None:
    """Refuse a descriptor that is not of a regular file (a FIFO, a device put at the log's name)."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LogRefused(f"{path} is not a plain file: move it away, and the broker makes its own file there")


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
    """Writes not yet in the file, encoded as the file holds them, with the SELECTs they need and
    MULTI/EXEC around a group of several (a transaction's or a script's); `write()` puts them in
    the file. `_session.LogBuffer` is the same in C, for the compiled read loop (which appends to
    it without a Python call per write, and writes it without one per batch). Only the event loop
    touches the buffer; the fsync thread reads `written`."""

    def __init__(self) -> None:
        self.db: int | None = None  # the database the log's next command runs on (None: it states it)
        self.fd = -1  # the log file's descriptor (AppendOnlyLog sets it)
        self.written = 0  # bytes written to the file, ever
        self._parts: list[bytes] = []
        self._group: list[bytes] | None = None  # a group's writes, kept together
        self._group_writes = 0

    def append(self, db: int, command: list[bytes]) -> None:
        target = self._group if self._group is not None else self._parts
        if db != self.db:
            target.append(pack_command((b"select", b"%d" % db)))
            self.db = db
        target.append(pack_command(tuple(command)))
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
        self._parts.extend(group)

    @property
    def pending(self) -> int:
        """Bytes appended (whole groups only) and not yet in the file."""
        return sum(map(len, self._parts))

    def write(self) -> None:
        """Everything appended (whole groups only) into the file. Raises OSError if the file
        refuses some of it: that part stays, first, for the next write."""
        if not self._parts:
            return
        view = memoryview(self._parts[0] if len(self._parts) == 1 else b"".join(self._parts))
        try:
            while view:
                written = os.write(self.fd, view)
                if not written:  # (never from a regular file: no endless loop on it either)
                    raise OSError(errno.EIO, "the file took no bytes")
                self.written += written
                view = view[written:]
        finally:
            self._parts = [bytes(view)] if view else []

    def clear(self) -> None:
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
        self._dir: int | None = None  # the folder's descriptor: every file here is opened in it
        self._fd: int | None = None
        self._fd_lock = threading.Lock()  # which file is the log: the fsync thread against rewrites and close
        self._synced = 0  # buffer.written when the last fsync began: what it covers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._size_offset = 0  # the file's size is buffer.written + this
        self.base_size = 0  # size after the last rewrite (or load)
        self.last_fsync = 0.0
        self.last_rewrite = 0.0
        self.rewrites = 0
        self._next_rewrite = rewrite_min_bytes  # needs_rewrite's threshold
        self._errors = {"write": "", "fsync": ""}  # the loop's writes, the thread's fsyncs: each its own
        self._errors_lock = threading.Lock()
        self.error = ""  # the last write or fsync the disk refused, until one succeeds again

    @property
    def size(self) -> int:
        return self.buffer.written + self._size_offset

    # -- the folder and its files, never through a link --------------------------------------------

    def _open_folder(self) -> int:
        if self._dir is None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            except FileExistsError:  # a file, or a link to nothing: said below
                pass
            try:
                self._dir = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | NO_FOLLOW)
            except OSError as error:
                raise LogRefused(_refusal(self.folder, error, folder=True)) from None
        return self._dir

    def _open(self, name: str, flags: int) -> int:
        """A file of the folder's, opened without following a link (O_NONBLOCK: a FIFO put there
        must not hang the start); FileNotFoundError and FileExistsError (O_EXCL) pass, the rest is
        LogRefused."""
        try:
            fd = os.open(name, flags | NO_FOLLOW | os.O_NONBLOCK, 0o600, dir_fd=self._open_folder())
        except (FileNotFoundError, FileExistsError):
            raise
        except OSError as error:
            raise LogRefused(_refusal(self.folder / name, error)) from None
        _plain_file(fd, self.folder / name)
        os.set_blocking(fd, True)
        return fd

    def _sync_folder(self) -> None:
        """Make a file's creation or renaming in the folder durable (best effort: not every file system can)."""
        try:
            os.fsync(self._open_folder())
        except OSError:
            pass

    # -- start ------------------------------------------------------------------------------------

    def load(self, execute: Callable[[int, list[bytes]], bool]) -> LoadReport:
        """Replay the log through `execute(db, command) -> ok`; cut off and set aside a broken tail."""
        report = LoadReport()
        self._remove_stale_rewrite()
        try:
            fd = self._open(LOG_NAME, os.O_RDWR)
        except FileNotFoundError:
            return report
        try:
            started = time.monotonic()
            data = _read_all(fd)
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
                os.ftruncate(fd, good)  # only once the tail is safely in its own file
                os.fsync(fd)
        finally:
            os.close(fd)
        report.seconds = time.monotonic() - started
        return report

    def _remove_stale_rewrite(self) -> None:
        """A compaction cut short by a crash leaves its file: the log is still whole, so it goes
        (a link there is refused, never removed silently: someone put it there)."""
        folder = self._open_folder()
        try:
            found = os.stat(REWRITE_NAME, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(found.st_mode):
            raise LogRefused(_link_refusal(self.folder / REWRITE_NAME))
        if not stat.S_ISREG(found.st_mode):
            raise LogRefused(f"{self.folder / REWRITE_NAME} is not a plain file: the broker writes its compacted "
                             "log there; move it away")
        os.unlink(REWRITE_NAME, dir_fd=folder)

    def _set_aside(self, tail: bytes) -> Path:
        """Write a broken tail to a new file beside the log (never over an earlier one, nor through
        a link), durably."""
        stem = f"{BROKEN_NAME}{time.strftime('%Y%m%d-%H%M%S')}"
        for attempt in range(1, 10_000):
            name = stem if attempt == 1 else f"{stem}-{attempt}"
            try:
                fd = self._open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                continue
            try:
                _write_all(fd, tail)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._sync_folder()
            return self.folder / name
        raise OSError(f"no free name for {stem} in {self.folder}")

    def open(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND
        try:
            fd = self._open(LOG_NAME, flags)
        except FileNotFoundError:
            fd = self._open(LOG_NAME, flags | os.O_CREAT | os.O_EXCL)
            self._sync_folder()
        self._fd = self.buffer.fd = fd
        self._synced = self.buffer.written
        self.base_size = os.fstat(fd).st_size
        self._size_offset = self.base_size - self.buffer.written
        self._next_rewrite = max(self.rewrite_min_bytes, 2 * self.base_size)
        self.buffer.db = None  # the next command states its database
        self._thread = threading.Thread(target=self._fsyncer, name="aof-fsync", daemon=True)
        self._thread.start()

    # -- the event loop's side --------------------------------------------------------------------

    def append(self, db: int, command: list[bytes]) -> None:
        self.buffer.append(db, command)

    def begin_group(self) -> None:
        self.buffer.begin_group()

    def end_group(self) -> None:
        self.buffer.end_group()

    def write(self) -> bool:
        """The buffer's writes into the file (the kernel's), one write(2) in the usual case; True
        once nothing is left unwritten. What the disk refuses stays in the buffer, first, to be
        tried again: the file stays a prefix of the writes, in order."""
        try:
            self.buffer.write()
        except OSError as error:
            self._set_error("write", error)
            return False
        if self._errors["write"]:
            self._set_error("write", None)
        return True

    def needs_rewrite(self) -> bool:
        """True once the log is rewrite_min_bytes big and has doubled since it was last compacted.

        Asked each second. If the compaction then does not happen (a type the snapshot cannot
        write, a full disk), the answer stays False until the log has doubled once more: a
        snapshot of all the data again and again would bring the broker to a crawl."""
        if self.size < self._next_rewrite:
            return False
        self._next_rewrite = 2 * self.size
        return True

    # -- the fsync thread -------------------------------------------------------------------------

    def _fsyncer(self) -> None:
        while not self._stop.wait(FSYNC_INTERVAL):
            try:
                self.sync()
            except Exception:  # a fault of ours must not end the fsyncs for good
                log.exception("the append-only log's fsync thread failed; trying again")

    def sync(self) -> None:
        """fsync what has been written. On a descriptor of its own (dup), outside the lock: the
        loop's writes never wait for an fsync (which can take long on a busy disk)."""
        with self._fd_lock:
            written = self.buffer.written
            if self._fd is None or written == self._synced:
                return
            fd = os.dup(self._fd)
        try:
            os.fsync(fd)
        except OSError as error:
            self._set_error("fsync", error)
            return
        finally:
            os.close(fd)
        with self._fd_lock:
            self._synced = max(self._synced, written)
        self.last_fsync = time.time()
        if self._errors["fsync"]:
            self._set_error("fsync", None)

    def _set_error(self, what: str, error: OSError | None) -> None:
        """Note (or clear) the failure of the loop's writes or of the thread's fsyncs; `error` is
        whichever is failing. Logged once as it starts and once as it ends."""
        with self._errors_lock:
            was = self.error
            self._errors[what] = f"{what}: {error.strerror or error}" if error is not None else ""
            self.error = self._errors["write"] or self._errors["fsync"]
        if self.error and not was:
            log.error("cannot %s the append-only log %s (%s); the writes are kept in memory and tried again",
                      what, self.path, self.error)
        elif was and not self.error:
            log.warning("the append-only log %s is written again (after: %s)", self.path, was)

    # -- compaction ---------------------------------------------------------------------------------

    def rewrite(self, snapshot: list[tuple[int, list[bytes]]]) -> bool:
        """Replace the log by `snapshot` (the commands that rebuild the data now), atomically.

        Runs on the event loop, between batches or in one (SAVE): no write can come in between.
        Writes not yet in the file are in the snapshot already: they are dropped, not written
        twice. If the new file cannot be written, the full log and those writes are kept (False).
        """
        started = time.monotonic()
        chunks, current = [], None
        for db, command in snapshot:
            if db != current:
                chunks.append(pack_command((b"select", b"%d" % db)))
                current = db
            chunks.append(pack_command(tuple(command)))
        data = b"".join(chunks)
        fd = None
        try:
            self._remove_stale_rewrite()
            # the new file's descriptor, kept open for the appends after it: it is the log once renamed
            fd = self._open(REWRITE_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND)
            _write_all(fd, data)
            os.fsync(fd)
            with self._fd_lock:
                os.replace(REWRITE_NAME, LOG_NAME, src_dir_fd=self._dir, dst_dir_fd=self._dir)
                self.buffer.clear()
                old, self._fd, fd = self._fd, fd, None
                self.buffer.fd = self._fd
                self._synced = self.buffer.written  # (the new file is fsynced whole)
                previous = self.size
                self._size_offset = len(data) - self.buffer.written
        except (OSError, LogRefused) as error:
            log.error("cannot compact the append-only log (%s: %s): the full log is kept", self.folder / REWRITE_NAME,
                      error.strerror or error if isinstance(error, OSError) else error)
            if fd is not None:
                os.close(fd)
                try:
                    os.unlink(REWRITE_NAME, dir_fd=self._dir)
                except OSError:
                    pass
            return False
        if old is not None:
            try:
                os.close(old)  # the replaced file's (what was written there is in the snapshot)
            except OSError:
                pass
        self._sync_folder()
        self.buffer.db = current
        self.base_size = self.size
        self._next_rewrite = max(self.rewrite_min_bytes, 2 * self.base_size)
        self.last_rewrite = time.time()
        self.rewrites += 1
        if self.error:  # everything is in the new file, fsynced
            self._set_error("write", None)
            self._set_error("fsync", None)
        log.info("append-only log compacted: %d → %d bytes (%d commands) in %.2f s", previous, self.size,
                 len(snapshot), time.monotonic() - started)
        return True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.write()
        self.sync()
        if self.buffer.pending:
            log.error("%d bytes of writes could not be written to the append-only log %s: they are lost",
                      self.buffer.pending, self.path)
        with self._fd_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
                self.buffer.fd = -1
        if self._dir is not None:
            os.close(self._dir)
            self._dir = None
