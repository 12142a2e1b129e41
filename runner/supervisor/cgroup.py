"""A cgroup (v2) of its own for `up` and everything it starts, where the machine lets `up` make one.

`up` makes a child of the cgroup it runs in and moves itself there before it starts anything:
every process it starts, and every child or daemon of theirs, is born in it and cannot leave it
(only a process allowed to write to cgroup files could move one out). So when `up` is gone, its
watchdog finds all of them there, even a daemon that cleared its environment, and
`cgroup.kill` (Linux 5.14) ends them in one step, forks in flight included.

Root can make one wherever cgroup v2 is mounted; a user only in a cgroup delegated to them
(`systemd-run --user --scope -p Delegate=yes …`). Elsewhere `create` says why not and `up` falls
back to the environment marker alone (runner.supervisor.watchdog).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

PREFIX = "dify-local-up."  # + the pid of the `up`
MOUNTINFO_LIMIT = 1 << 20  # bytes of /proc/self/mountinfo read (a few KB on any machine)
MEMBERS_LIMIT = 1 << 20  # bytes of one cgroup.procs read


def _read(path: Path, limit: int) -> str:
    with open(path, "rb") as handle:
        return handle.read(limit).decode("utf-8", "replace")


def own_cgroup_folder() -> Path:
    """The folder of the cgroup v2 this process is in; OSError (with the reason) if there is none."""
    relative = None
    for line in _read(Path("/proc/self/cgroup"), MOUNTINFO_LIMIT).splitlines():
        if line.startswith("0::"):
            relative = line[3:]
    if relative is None:
        raise OSError("this system has no cgroup v2 hierarchy")
    for line in _read(Path("/proc/self/mountinfo"), MOUNTINFO_LIMIT).splitlines():
        fields = line.split()
        if "-" in fields and fields[fields.index("-") + 1:fields.index("-") + 2] == ["cgroup2"]:
            root, mount = fields[3], fields[4].replace("\\040", " ")
            inside = os.path.relpath(relative, root)
            if not inside.startswith(".."):
                return Path(mount) / inside if inside != "." else Path(mount)
    raise OSError("no cgroup v2 file system is mounted")


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@dataclass(frozen=True)
class Cgroup:
    path: Path
    parent: Path  # the cgroup `up` came from, where it goes back when it stops

    @classmethod
    def create(cls) -> tuple["Cgroup | None", str]:
        """A new cgroup for this process's children, or None and why there is none."""
        try:
            parent = own_cgroup_folder()
            cls._remove_stale(parent)
            path = parent / f"{PREFIX}{os.getpid()}"
            os.mkdir(path)
        except OSError as error:
            return None, error.strerror or str(error)
        return cls(path, parent), ""

    @staticmethod
    def _remove_stale(parent: Path) -> None:
        """Empty cgroups of `up`s that are gone and whose watchdog could not remove them."""
        try:
            entries = [entry for entry in os.scandir(parent) if entry.name.startswith(PREFIX)]
        except OSError:
            return
        for entry in entries:
            pid = entry.name[len(PREFIX):]
            if pid.isdigit() and not _pid_running(int(pid)):
                try:
                    os.rmdir(entry.path)  # refused while anything is in it
                except OSError:
                    pass

    def _move(self, folder: Path, pid: int) -> None:
        with open(folder / "cgroup.procs", "w") as procs:
            procs.write(str(pid))

    def join(self) -> str:
        """Move this process in; "" or why it could not (then remove the cgroup)."""
        try:
            self._move(self.path, os.getpid())
        except OSError as error:
            self.remove()
            return error.strerror or str(error)
        return ""

    def leave(self) -> None:
        try:
            self._move(self.parent, os.getpid())
        except OSError:
            pass

    def members(self) -> set[int]:
        """Every process in it and in the cgroups below it (a nested `up`'s)."""
        pids: set[int] = set()
        for folder, _, _ in os.walk(self.path):
            try:
                pids.update(int(pid) for pid in _read(Path(folder) / "cgroup.procs", MEMBERS_LIMIT).split())
            except (OSError, ValueError):
                continue
        return pids

    def kill(self) -> None:
        """SIGKILL everything in it: cgroup.kill where the kernel has it, one by one otherwise."""
        try:
            with open(self.path / "cgroup.kill", "w") as kill:
                kill.write("1")
            return
        except OSError:
            pass
        for pid in self.members():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue

    def remove(self) -> bool:
        for folder, _, _ in sorted(os.walk(self.path), key=lambda item: -len(item[0])):
            try:
                os.rmdir(folder)
            except OSError:
                return False
        return True
