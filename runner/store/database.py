"""The metadata store's connections: SQLite in WAL mode, pooled per process.

SQLite has no server, so Dify's SQLALCHEMY_POOL_* settings govern this pool instead: POOL_SIZE
connections are kept, MAX_OVERFLOW more may be opened under load and are closed when returned,
POOL_RECYCLE reopens old connections, and POOL_TIMEOUT is both how long a caller waits for a free
connection and SQLite's busy timeout on a locked database.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import sqlite_utils

from runner.errors import StateError
from runner.safe_files import explain, refuse_links
from runner.state import SQLITE_COMPANIONS

CORRUPT = ("SQLITE_NOTADB", "SQLITE_CORRUPT")
CANNOT_WRITE = ("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH")


class DatabaseBusy(Exception):
    """No connection came free in time."""


class DatabaseUnusable(StateError, sqlite3.DatabaseError):
    """The database file is not a SQLite database, is damaged, or cannot be opened for writing."""


def unusable(path: Path, error: sqlite3.DatabaseError) -> DatabaseUnusable | None:
    """What a SQLite error means for the user, when it is one only they can fix (a locked database
    is not: it is waited for)."""
    name = getattr(error, "sqlite_errorname", "") or ""
    if name.startswith(CORRUPT) or (type(error) is sqlite3.DatabaseError and "not a database" in str(error)):
        return DatabaseUnusable(
            f"the metadata database {path} is damaged or not a SQLite database ({error}): stop the stack, move it "
            f"aside (mv {path} {path}.broken) and start again for a new, empty one, or restore it from a backup")
    if name.startswith(CANNOT_WRITE) and path.is_dir():
        return DatabaseUnusable(f"the metadata database {path} is a folder, not a file: move it away (dify-local makes "
                                "the database)")
    if name.startswith(CANNOT_WRITE):
        return DatabaseUnusable(
            f"cannot open the metadata database {path} for writing ({error}): make {path.parent} and the files "
            "metadata.db* in it writable by this user, or set DIFY_LOCAL_STATE_DIR (or --state-dir) to another "
            "folder")
    return None


@dataclass(frozen=True)
class PoolLimits:
    size: int = 30
    overflow: int = 10
    recycle: int = 3600  # seconds; -1 never
    timeout: int = 30  # seconds

    @classmethod
    def from_settings(cls, settings) -> "PoolLimits":
        return cls(settings.SQLALCHEMY_POOL_SIZE, settings.SQLALCHEMY_MAX_OVERFLOW,
                   settings.SQLALCHEMY_POOL_RECYCLE, settings.SQLALCHEMY_POOL_TIMEOUT)


def open_connection(path: Path, busy_timeout: float) -> sqlite_utils.Database:
    """A connection, wrapped by sqlite-utils once (wrapping runs a PRAGMA and plugin hooks).

    SQLite follows a symbolic link at the database or its -wal/-shm/-journal (the unix VFS has no
    O_NOFOLLOW for them), so the folder and those names are checked first."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # the state folder: its owner's alone
    except OSError as error:
        raise explain(path.parent, path.parent, error) from None
    refuse_links(path.parent, [path.name] + [path.name + suffix for suffix in SQLITE_COMPANIONS])
    try:
        conn = sqlite3.connect(str(path), timeout=busy_timeout, check_same_thread=False)
    except sqlite3.DatabaseError as error:
        raise unusable(path, error) or error from None
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across application crashes in WAL mode; only a power loss can undo the
        # last commits, which is the trade Dify's PostgreSQL defaults make too.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={min(int(busy_timeout * 1000), 2**31 - 1)}")  # SQLite's is an int of ms
    except sqlite3.DatabaseError as error:
        conn.close()
        raise unusable(path, error) or error from None
    return sqlite_utils.Database(conn)


class Database:
    """A pool of connections to one SQLite file; `with db.connect() as conn:` borrows one."""

    def __init__(self, path: Path, limits: PoolLimits = PoolLimits()):
        self.path = path
        self.limits = limits
        self._idle: queue.LifoQueue[tuple[sqlite_utils.Database, float]] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._open = 0

    def _checkout(self) -> tuple[sqlite_utils.Database, float]:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._open < self.limits.size + self.limits.overflow:
                self._open += 1
                try:
                    return open_connection(self.path, self.limits.timeout), time.monotonic()
                except BaseException:
                    self._open -= 1
                    raise
        try:
            return self._idle.get(timeout=self.limits.timeout)
        except queue.Empty:
            raise DatabaseBusy(
                f"no free connection to {self.path} within {self.limits.timeout} s "
                f"(SQLALCHEMY_POOL_SIZE={self.limits.size}, SQLALCHEMY_MAX_OVERFLOW={self.limits.overflow})"
            ) from None

    def _checkin(self, db: sqlite_utils.Database, opened: float) -> None:
        expired = self.limits.recycle >= 0 and time.monotonic() - opened > self.limits.recycle
        if expired or self._idle.qsize() >= self.limits.size:
            db.conn.close()
            with self._lock:
                self._open -= 1
            return
        self._idle.put((db, opened))

    @contextmanager
    def connect(self) -> Iterator[sqlite_utils.Database]:
        """Borrow a connection wrapped by sqlite-utils; uncommitted work is rolled back on return."""
        db, opened = self._checkout()
        try:
            yield db
        except sqlite3.DatabaseError as error:
            found = unusable(self.path, error) if not isinstance(error, DatabaseUnusable) else None
            if found is None:
                raise
            raise found from error
        finally:
            if db.conn.in_transaction:
                db.conn.rollback()
            self._checkin(db, opened)

    @contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """Borrow a connection inside one committed-or-rolled-back transaction."""
        with self.connect() as db:
            with db.conn:
                yield db

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's connections unused (SQLite connections must not
        cross a fork, and closing them here could disturb the parent's)."""
        self._idle = queue.LifoQueue()
        self._lock = threading.Lock()
        self._open = 0

    def close(self) -> None:
        while True:
            try:
                db, _ = self._idle.get_nowait()
            except queue.Empty:
                break
            db.conn.close()
            with self._lock:
                self._open -= 1
