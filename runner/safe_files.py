"""Files and folders of the state folder, reached without ever following a symbolic link.

A path is walked from the state folder one folder at a time, each opened with O_NOFOLLOW and the
next looked up relative to it (dir_fd=), and the file at the end is opened with O_NOFOLLOW too: a
link planted at any step, at a file or at a folder above it, is refused with one line naming it
instead of redirecting a write (the review emptied /etc/passwd through a linked log file). The
state folder itself must not be a link either; the folders above it are the user's own business.

Every opener of a state file uses this module; where a library opens a path itself (SQLite, beat's
shelve), `refuse_links` checks the path first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import stat
from pathlib import Path, PurePath
from typing import IO, Iterable, Iterator

from runner.capped_files import read_handle_capped
from runner.errors import StateError

FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_MODES = {  # open()'s modes, as flags
    "r": os.O_RDONLY,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
}
SET_STATE_DIR = "set DIFY_LOCAL_STATE_DIR (or --state-dir)"
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
BAD_SETTING = 2  # the exit status of a bad setting: DIFY_LOCAL_STATE_DIR names a link or a file


class LinkInStateFolder(StateError):
    def __init__(self, path: Path, root: Path):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        if path == root:
            message = (f"the state folder {path} is a symbolic link (to {target}): dify-local never follows one "
                       f"there; {SET_STATE_DIR} to the folder itself")
        else:
            message = (f"{path} is a symbolic link (to {target}): dify-local never follows one in its state "
                       f"folder; remove the link (rm {path}) and start again")
        super().__init__(message, exit_status=BAD_SETTING if path == root else 1)
        self.path = path


def _link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def explain(path: Path, root: Path, error: OSError) -> Exception:
    """What an OSError at `path` (the state folder or a path in it) means for the user, as a
    StateError; the error itself when it says nothing they must fix."""
    if _link(path):
        return LinkInStateFolder(path, root)
    if error.errno in NOT_WRITABLE:
        folder = path if path.is_dir() else path.parent
        return StateError(f"cannot write in {folder} ({os.strerror(error.errno)}): make it writable by this user "
                          f"(chmod u+rwx {folder}, or chown), or {SET_STATE_DIR} to another folder")
    if error.errno in (errno.ENOTDIR, errno.EEXIST) and path.exists() and not path.is_dir():
        if path == root:
            return StateError(f"the state folder {path} is a file, not a folder: move the file away, or "
                              f"{SET_STATE_DIR} to a folder", BAD_SETTING)
        return StateError(f"{path} is a file where the state folder keeps a folder: move it away "
                          "(dify-local makes the folder)")
    if error.errno == errno.ENOTDIR:
        above = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
        if above is not None:
            return StateError(f"cannot make {path}: {above} is a file, not a folder; {SET_STATE_DIR} to a folder",
                              BAD_SETTING)
    return error


KINDS = {stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket", stat.S_IFCHR: "device", stat.S_IFBLK: "device",
         stat.S_IFDIR: "folder", stat.S_IFREG: "file"}


def wrong_kind(path: Path, root: Path, kind: str) -> StateError:
    """A path of the state folder that holds another kind of thing than the one kept there."""
    if path == root:
        return StateError(f"the state folder {path} is a file, not a folder: move the file away, or "
                          f"{SET_STATE_DIR} to a folder", BAD_SETTING)
    found = KINDS.get(stat.S_IFMT(os.lstat(path).st_mode), "special file")
    return StateError(f"{path} is a {found} where the state folder keeps a {kind}: move it away "
                      f"(dify-local makes the {kind})")


def _parts(root: Path, path: PurePath | str) -> tuple[str, ...]:
    """`path` (absolute, or relative to the state folder) as names below the state folder."""
    relative = PurePath(path)
    if relative.is_absolute():  # both made absolute the same way (a state folder given as ../x)
        relative = PurePath(os.path.abspath(relative)).relative_to(os.path.abspath(root))
    if any(part in ("..", ".") for part in relative.parts):
        raise ValueError(f"{path} is not a plain path inside the state folder {root}")
    return relative.parts


def _above(parts: tuple[str, ...]) -> PurePath:
    """The folder of a path given as its parts (the state folder for a name directly in it)."""
    return PurePath(*parts[:-1])


def _open_root(root: Path, create: bool) -> int:
    try:
        return os.open(root, FOLDER_FLAGS)
    except FileNotFoundError:
        if not create:
            raise
    except OSError as error:
        raise explain(root, root, error) from None
    try:
        root.parent.mkdir(parents=True, exist_ok=True)  # the folders above it are the user's
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process of the stack
            os.mkdir(root, 0o700)
        return os.open(root, FOLDER_FLAGS)
    except OSError as error:
        raise explain(root, root, error) from None


def _open_child(fd: int, name: str, create: bool) -> int:
    try:
        return os.open(name, FOLDER_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise
    with contextlib.suppress(FileExistsError):  # made meanwhile by another process of the stack
        os.mkdir(name, 0o700, dir_fd=fd)
    return os.open(name, FOLDER_FLAGS, dir_fd=fd)


def _walk(root: Path, parts: Iterable[str], create: bool) -> int:
    """A descriptor of the folder root/parts…, every step opened without following a link."""
    fd = _open_root(root, create)
    here = root
    try:
        for part in parts:
            here = here / part
            try:
                child = _open_child(fd, part, create)
            except FileNotFoundError:
                raise
            except OSError as error:
                raise explain(here, root, error) from None
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def folder(root: Path, path: PurePath | str = "", create: bool = True) -> Iterator[int]:
    """A descriptor of a folder of the state folder (made, owner-only, when missing and `create`)."""
    fd = _walk(root, _parts(root, path), create)
    try:
        yield fd
    finally:
        os.close(fd)


def ensure_folders(root: Path, paths: Iterable[PurePath | str]) -> None:
    for path in paths:
        with folder(root, path):
            pass


def open_fd(root: Path, path: PurePath | str, flags: int, perms: int = 0o600) -> int:
    """os.open of a state file: refused when it, or a folder above it, is a link or not what it
    should be. Folders above it are made for a write."""
    parts = _parts(root, path)
    writing = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    with folder(root, _above(parts), create=writing) as parent:
        try:
            # O_NONBLOCK: a FIFO planted at the path must not hang the open; cleared below
            fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, perms, dir_fd=parent)
        except OSError as error:
            if error.errno in (errno.ELOOP, errno.EEXIST) and _link(root.joinpath(*parts)):
                raise LinkInStateFolder(root.joinpath(*parts), root) from None
            if error.errno == errno.ENXIO:  # a FIFO (or a socket) nobody reads, where a file goes
                raise wrong_kind(root.joinpath(*parts), root, "file") from None
            if error.errno in NOT_WRITABLE and writing:
                raise explain(root.joinpath(*parts), root, error) from None
            raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise wrong_kind(root.joinpath(*parts), root, "file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(root: Path, path: PurePath | str, mode: str = "rb", encoding: str | None = None,
              errors: str | None = None, perms: int = 0o600) -> IO:
    """open() for a state file, with the same modes ("r", "wb", "a", "x" …; "+" is not needed here)."""
    flags = FILE_MODES[mode.replace("b", "").replace("t", "")]
    fd = open_fd(root, path, flags, perms)
    return os.fdopen(fd, mode, encoding=None if "b" in mode else (encoding or "utf-8"), errors=errors)


def read_bytes(root: Path, path: PurePath | str, limit: int | None = None, what: str = "this file") -> bytes:
    """A state file's content; FileTooLarge (runner.capped_files, a ValueError) past `limit` bytes,
    `what` saying what it was read as (every file we read is bounded)."""
    with open_file(root, path, "rb") as handle:
        if limit is None:
            return handle.read()
        return read_handle_capped(handle, root.joinpath(*_parts(root, path)), limit, what)


def write_atomic(root: Path, path: PurePath | str, data: bytes) -> None:
    """Write a state file whole or not at all: a partial file beside it, renamed over it."""
    parts = _parts(root, path)
    partial = f".{parts[-1]}.{secrets.token_hex(4)}.partial"
    above = _above(parts)
    with open_file(root, above / partial, "xb") as out:
        out.write(data)
    with folder(root, above) as parent:
        try:
            os.replace(partial, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial, dir_fd=parent)
            raise


def replace(root: Path, source: PurePath | str, target: PurePath | str) -> None:
    """Rename a state path over another (a link at the target is replaced, never followed)."""
    source_parts, target_parts = _parts(root, source), _parts(root, target)
    with folder(root, _above(source_parts), create=False) as src, \
            folder(root, _above(target_parts)) as dst:
        os.replace(source_parts[-1], target_parts[-1], src_dir_fd=src, dst_dir_fd=dst)


def remove(root: Path, path: PurePath | str) -> bool:
    """Remove a state file (a link itself, never its target); False when there was none."""
    parts = _parts(root, path)
    try:
        with folder(root, _above(parts), create=False) as parent:
            os.unlink(parts[-1], dir_fd=parent)
    except (FileNotFoundError, IsADirectoryError):
        return False
    return True


def remove_tree(root: Path, path: PurePath | str) -> int:
    """Remove a folder of the state folder and everything in it (links themselves, never what they
    point to); how many files went (0 when there was no such folder)."""
    parts = _parts(root, path)
    if not parts:
        raise ValueError("the state folder itself is never removed")
    try:
        with folder(root, _above(parts), create=False) as parent:
            if not stat.S_ISDIR(os.lstat(parts[-1], dir_fd=parent).st_mode):
                os.unlink(parts[-1], dir_fd=parent)
                return 1
            files = sum(len(names) for _, _, names, _ in os.fwalk(parts[-1], dir_fd=parent))
            shutil.rmtree(parts[-1], dir_fd=parent)  # descriptor-based: safe from links inside
            return files
    except FileNotFoundError:
        return 0


def list_folder(root: Path, path: PurePath | str) -> list[str]:
    """The names in a folder of the state folder ([] when there is none yet)."""
    try:
        with folder(root, path, create=False) as fd:
            return os.listdir(fd)
    except FileNotFoundError:
        return []


def exists(root: Path, path: PurePath | str) -> bool:
    """Whether a state path is there (a link counts, and is refused by whatever opens it)."""
    parts = _parts(root, path)
    try:
        with folder(root, _above(parts), create=False) as parent:
            if parts:
                os.lstat(parts[-1], dir_fd=parent)
    except FileNotFoundError:
        return False
    return True


def refuse_links(folder_path: Path, names: Iterable[str]) -> None:
    """For a library that opens paths itself (SQLite and its -wal/-shm/-journal, beat's shelve):
    the folder and each of its files named must not be symbolic links."""
    if _link(folder_path):
        raise LinkInStateFolder(folder_path, folder_path)
    for name in names:
        if _link(folder_path / name):
            raise LinkInStateFolder(folder_path / name, folder_path.parent)
