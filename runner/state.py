"""Where everything lives inside the state folder: the one place for these paths.

Each path is declared once, as a `Place` of StatePaths; `StatePaths.places()` lists them all, for
the check that none is a symbolic link nor the wrong kind of thing (`check`, at every start) and for
the tests that plant a link at each. Files and folders of the state folder are opened through runner.safe_files, which
never follows a link.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import ClassVar

from runner import safe_files

FILE, FOLDER, SOCKET = "file", "folder", "socket"
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")  # the files SQLite keeps beside a database, and opens itself


class Place:
    """A path of the state folder, relative to it, with what is kept there."""

    def __init__(self, relative: str, kind: str, what: str):
        self.relative = PurePath(relative)
        self.kind = kind
        self.what = what
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        owner.PLACES = {**getattr(owner, "PLACES", {}), name: self}

    def __get__(self, paths: "StatePaths | None", owner: type) -> "Path | Place":
        return self if paths is None else paths.root / self.relative


@dataclass(frozen=True)
class StatePaths:
    root: Path
    PLACES: ClassVar[dict[str, Place]]

    database = Place("metadata.db", FILE, "the metadata database (SQLite)")
    database_wal = Place("metadata.db-wal", FILE, "SQLite's write-ahead log of the database")
    database_shm = Place("metadata.db-shm", FILE, "SQLite's shared-memory index of the write-ahead log")
    database_journal = Place("metadata.db-journal", FILE, "SQLite's rollback journal")
    files = Place("files", FOLDER, "the local file store (uploads, run logs, outbox, plugins)")
    outbox = Place("files/outbox", FOLDER, "mails delivered locally, one .eml file each")
    temp = Place("files/tmp", FOLDER, "scratch files; retention removes those older than DIFY_LOCAL_TEMP_FILE_HOURS")
    datasets = Place("files/datasets", FOLDER, "uploaded documents, a folder per dataset")
    run_logs = Place("files/workflow-runs", FOLDER, "workflow run logs, one JSON file per run")
    plugin_packages = Place("files/plugin-packages", FOLDER, "uploaded plugin packages waiting to be installed")
    plugins = Place("files/plugins", FOLDER, "installed plugins, a folder per name")
    plugins_lock = Place("files/plugins/.lock", FILE, "the lock one plugin install or removal holds")
    logs = Place("logs", FOLDER, "every process's lines, NAME.log rotated to NAME.log.1 …")
    beat_schedule = Place("beat-schedule", FILE, "beat's schedule (a shelve: one of the files below)")
    beat_schedule_db = Place("beat-schedule.db", FILE, "beat's schedule, as dbm.ndbm names it")
    beat_schedule_dat = Place("beat-schedule.dat", FILE, "beat's schedule, as dbm.dumb names it")
    beat_schedule_dir = Place("beat-schedule.dir", FILE, "beat's schedule index, as dbm.dumb names it")
    beat_schedule_bak = Place("beat-schedule.bak", FILE, "beat's schedule backup, as dbm.dumb names it")
    broker = Place("broker", FOLDER, "the embedded broker's append-only log")
    control_socket = Place("control.sock", SOCKET, "the socket `ps`, `logs`, `down` … reach a running `up` at")
    supervisor_info = Place("supervisor.json", FILE, "the running `up`: its pid and command-line settings")
    program_links = Place("bin", FOLDER, "the binary's `dify-local` link, for its children's PATH")
    up_lock = Place("up.lock", FILE, "held (flock) by the `up` that runs on this folder (runner.state_access)")
    broker_lock = Place("broker.lock", FILE, "held by the embedded broker that serves from this folder")
    broker_password = Place("broker-password", FILE, "the embedded broker's password when the user sets none "
                            "(runner.settings.generated), readable by its owner alone")
    beat_lock = Place("beat.lock", FILE, "held by the beat that keeps its schedule in this folder")

    @classmethod
    def places(cls) -> dict[str, Place]:
        return dict(cls.PLACES)

    def log_file(self, name: str) -> Path:
        """A process's log file (NAME.log; rotated ones NAME.log.1 …)."""
        return self.logs / f"{name}.log"

    @property
    def database_files(self) -> tuple[Path, ...]:
        """The database and the files SQLite keeps beside it."""
        return (self.database, self.database_wal, self.database_shm, self.database_journal)

    @property
    def beat_schedule_files(self) -> tuple[Path, ...]:
        """Every name beat's shelve may use (Celery's PersistentScheduler.known_suffixes)."""
        return (self.beat_schedule, self.beat_schedule_db, self.beat_schedule_dat, self.beat_schedule_dir,
                self.beat_schedule_bak)

    def ensure(self) -> "StatePaths":
        """Create the folder tree, readable by its owner only; a link or a file in the way, or a
        folder this user cannot write, is a StateError naming it."""
        self.check()
        safe_files.ensure_folders(self.root, ("", self.files.relative_to(self.root), self.logs.relative_to(self.root)))
        return self

    def check(self) -> None:
        """Refuse (a StateError naming it) the state folder, any path of it with a fixed name, or a
        log file, when it is a symbolic link or not the kind of thing kept there (a FIFO where a log
        goes, a file where a folder goes): every start checks, before any process opens one."""
        expected = [(self.root, FOLDER)] + [(self.root / place.relative, place.kind) for place in self.PLACES.values()]
        if _mode(self.logs) is not None and stat.S_ISDIR(_mode(self.logs)):
            expected += [(path, FILE) for path in sorted(self.logs.iterdir()) if LOG_NAME.match(path.name)]
        for path, kind in expected:
            mode = _mode(path)
            if mode is None:
                continue
            if stat.S_ISLNK(mode):
                raise safe_files.LinkInStateFolder(path, self.root)
            if not KIND_TEST[kind](mode):
                raise safe_files.wrong_kind(path, self.root, kind)


LOG_NAME = re.compile(r"^.+\.log(\.\d+)?$")  # a process's log and its rotations
KIND_TEST = {FOLDER: stat.S_ISDIR, FILE: stat.S_ISREG, SOCKET: lambda mode: not stat.S_ISDIR(mode)}


def _mode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_mode
    except OSError:  # none there (or a folder above it is not one: that folder is checked itself)
        return None
