"""The state folder is its owner's alone: created owner-only (0700), and used by one `up` and one
embedded broker at a time.

Who may get in. A folder that does not exist is created 0700. One of ours that others may read or
write (made by an older dify-local, or with a loose umask) is tightened to 0700, with a line that
says so. Refused, with one line: a folder of another user; one shared on purpose (the sticky bit,
as /tmp has); one that holds other files and none of ours (a project folder or ~ given as
--state-dir: not ours to change); and one under a folder every user may write to without the
sticky bit, where anyone could put a folder of theirs in its place. Group-writable folders above
it are left alone: with per-user groups (Debian's and Ubuntu's default) that is the norm.

One at a time. An exclusive flock on a file in the folder, held for the process's life (the kernel
drops it when the process dies, however it dies). `up`, `serve broker` and `serve beat` take one
each, since `up` starts the other two as its own children. Two beats on one folder would share
its schedule file and send every periodic task twice. The holder writes its identity (pid and start time)
into the file, so the one refused can name it. The watchdog of a killed `up` keeps that `up`'s lock
(it shares the open file) until it has stopped every process the `up` started: a new `up` waits
for it instead of finding their ports taken.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path
from typing import Callable

from runner.errors import StateError
from runner.process_identity import alive, identity_of, pid_of
from runner.safe_files import LinkInStateFolder, wrong_kind
from runner.state import StatePaths

OWNER_ONLY = 0o700
IDENTITY_BYTES = 64  # what a holder writes: "pid:start time"; more is never read
NEW_HOLDER_WAIT = 1.0  # seconds a fresh holder may take to write its identity
GONE_HOLDER_WAIT = 10.0  # seconds to wait for the processes of a killed `up` to stop
POLL = 0.05
CHOOSE_ANOTHER = "pick another with --state-dir or DIFY_LOCAL_STATE_DIR"


class StateFolderRefused(StateError):
    """This folder cannot be the state folder: one line, with what to do (a setting fixes it: exit 2)."""

    def __init__(self, message: str):
        super().__init__(message, exit_status=2)


class StateFolderBusy(Exception):
    """Another process holds the folder's lock: one line naming it."""


# -- who may get in --------------------------------------------------------------------------------

def _ours(root: Path) -> bool:
    """Empty, or holding something a state folder holds (a name of runner.state's places, or a log)."""
    names = {place.relative.parts[0] for place in StatePaths.places().values()}
    try:
        with os.scandir(root) as entries:
            seen = [entry.name for entry in entries]
    except OSError:  # its owner's, unreadable even to them: theirs to open up again
        return True
    return not seen or any(name in names for name in seen)


def _open_ancestor(root: Path) -> Path | None:
    """The first folder above `root` that every user may write to without the sticky bit."""
    for folder in Path(os.path.abspath(root)).parents:
        try:
            mode = os.stat(folder).st_mode
        except OSError:
            continue  # not there yet: created below
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            return folder
    return None


def make_private(root: Path) -> str | None:
    """Create the state folder owner-only, or check an existing one (see the module's docstring).

    Returns the line to show when it tightened the folder, None when there was nothing to do;
    raises StateFolderRefused for a folder it must not use (LinkInStateFolder for a link)."""
    if os.path.islink(root):  # never followed, not even to look at what it points to
        raise LinkInStateFolder(root, root)
    shared = _open_ancestor(root)
    if shared is not None:
        raise StateFolderRefused(
            f"{shared} is writable by every user (mode {stat.S_IMODE(os.stat(shared).st_mode):04o}), so anyone "
            f"could put a folder of theirs in place of the state folder {root}: {CHOOSE_ANOTHER}")
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(root, OWNER_ONLY)
        os.chmod(root, OWNER_ONLY)  # whatever the umask
        return None
    except FileExistsError:
        pass
    except OSError as error:
        raise StateFolderRefused(f"cannot create the state folder {root}: {error.strerror}; {CHOOSE_ANOTHER}") \
            from None
    try:
        info = os.stat(root)
    except OSError as error:
        raise StateFolderRefused(f"cannot use the state folder {root}: {error.strerror}; {CHOOSE_ANOTHER}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise wrong_kind(root, root, "folder")  # the same line as every other check of it
    if info.st_uid != os.geteuid():
        raise StateFolderRefused(f"the state folder {root} belongs to {_user(info.st_uid)}, not to you: "
                                 f"{CHOOSE_ANOTHER}")
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o077:
        return None
    if mode & stat.S_ISVTX:
        raise StateFolderRefused(f"{root} is a folder shared by every user (mode {mode:04o}): the state folder must "
                                 f"be a folder of its own; {CHOOSE_ANOTHER}")
    if not _ours(root):
        raise StateFolderRefused(f"{root} holds files that are not dify-local's and others may open it (mode "
                                 f"{mode:04o}): it will not be changed to be the state folder; {CHOOSE_ANOTHER}")
    os.chmod(root, OWNER_ONLY)
    if stat.S_IMODE(os.stat(root).st_mode) & 0o077:  # a file system without Unix modes (vfat, WSL's /mnt/c)
        raise StateFolderRefused(f"the state folder {root} stays open to others (mode {mode:04o}) on its file "
                                 f"system, which keeps no owner-only modes: {CHOOSE_ANOTHER}")
    return f"the state folder {root} was open to others (mode {mode:04o}): made it owner-only ({OWNER_ONLY:04o})"


def _user(uid: int) -> str:
    import pwd

    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


# -- one at a time ---------------------------------------------------------------------------------

def _open_lock_file(path: Path) -> int:
    # never through a symlink; O_NONBLOCK: a FIFO put there must not hang the open
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise StateFolderRefused(f"{path} is a symbolic link: dify-local never follows one in its state "
                                     "folder; remove it") from None
        raise StateFolderRefused(f"cannot open the lock file {path}: {error.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StateFolderRefused(f"{path} is not a regular file: remove it")
    return fd


def _holder(fd: int) -> str | None:
    text = os.pread(fd, IDENTITY_BYTES, 0).decode("ascii", "replace").strip()
    return text if pid_of(text) is not None else None


class StateLock:
    """The exclusive lock of one kind of holder (`up`, the broker) on a state folder."""

    def __init__(self, path: Path, holder: str, busy: str):
        self.path = path
        self.holder = holder  # who holds it, as a line names it: "`up`", "a broker"
        self.busy = busy  # what to do when it is held
        self.fd: int | None = None

    def acquire(self, wait_for_gone: float = 0.0, waiting: Callable[[str], None] | None = None) -> None:
        """Take the lock, or raise StateFolderBusy naming its holder.

        `wait_for_gone`: seconds to wait when the recorded holder has exited but the lock is still
        held (a killed `up`'s watchdog, stopping what it started); `waiting` is told once."""
        fd = _open_lock_file(self.path)
        began = time.monotonic()
        told = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass
                else:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, identity_of().encode(), 0)
                    self.fd, fd = fd, None
                    return
                holder = _holder(fd)
                waited = time.monotonic() - began
                if holder is not None and alive(holder):
                    raise StateFolderBusy(f"the state folder {self.path.parent} is in use by {self.holder} "
                                          f"(pid {pid_of(holder)}): {self.busy}")
                if holder is None and waited < NEW_HOLDER_WAIT:
                    pass  # it has only just taken the lock
                elif holder is not None and waited < wait_for_gone:
                    if waiting is not None and not told:
                        told = True
                        waiting(f"waiting for the processes of the previous {self.holder} (pid {pid_of(holder)}, "
                                "which is gone) to stop")
                else:
                    who = f"{self.holder} (pid {pid_of(holder)}), which is gone," if holder else "another process"
                    raise StateFolderBusy(f"the state folder {self.path.parent} is still locked by what {who} left "
                                          f"running: see `fuser -v {self.path}`, or {CHOOSE_ANOTHER}")
                time.sleep(POLL)
        finally:
            if fd is not None:
                os.close(fd)

    def check(self) -> None:
        """Raise StateFolderBusy if a live holder has it now (without keeping it)."""
        fd = _open_lock_file(self.path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                if holder is not None and alive(holder):
                    raise StateFolderBusy(f"the state folder {self.path.parent} is in use by {self.holder} "
                                          f"(pid {pid_of(holder)}): {self.busy}") from None
        finally:
            os.close(fd)  # the lock, if this took it, goes with it

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def up_lock(root: Path) -> StateLock:
    return StateLock(StatePaths(root).up_lock, "`up`",
                     "see `dify-local ps`, stop it with `dify-local down`, or use another --state-dir")


def broker_lock(root: Path) -> StateLock:
    return StateLock(StatePaths(root).broker_lock, "a broker",
                     "stop it (`dify-local down` if `up` started it), or use another --state-dir")


def beat_lock(root: Path) -> StateLock:
    return StateLock(StatePaths(root).beat_lock, "beat",
                     "one beat per stack, or its periodic tasks run twice (`dify-local down` if `up` started it)")
