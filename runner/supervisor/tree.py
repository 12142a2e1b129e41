"""The process tree under the supervisor: nothing it started, nor any child of one, may outlive it.

On Linux the supervisor becomes a child subreaper, so a grandchild whose parent dies (or that left
its process group with setsid) is re-parented to the supervisor instead of to init: it stays in
the tree where `stop` can find it, and the supervisor reaps it when it exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

import psutil

PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, argument) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, argument, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def name_process(name: bytes) -> bool:
    """This process's short name (15 bytes), as `ps -o comm` and top show it."""
    return _prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]))


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie has exited already; it only waits to be reaped)."""
    living = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                living.append(process)
        except psutil.Error:
            continue
    return living


def memory_of(pid: int) -> int:
    """RSS in bytes of a process and all its descendants (the seed sizes workers by memory)."""
    total = 0
    try:
        members = [psutil.Process(pid), *descendants(pid)]
    except psutil.Error:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            continue
    return total


def kill(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue


def _own_children() -> list[int]:
    """Pids of this process's direct children. Linux lists them per thread under /proc (cheap);
    elsewhere psutil scans every process."""
    tasks = Path("/proc/self/task")
    try:
        return [int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()]
    except OSError:
        return [child.pid for child in psutil.Process().children()]


def reap_orphans(managed: set[int]) -> None:
    """Collect the exit status of re-parented grandchildren (never of a process we manage:
    its Popen waits for it)."""
    for pid in _own_children():
        if pid in managed:
            continue
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                os.waitpid(pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            continue


def suspended(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP, SIGTSTP, a debugger): alive, so no exit tells the
    supervisor, yet it answers nothing until it gets SIGCONT."""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
    except psutil.Error:
        return False
