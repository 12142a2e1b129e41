"""A process named so that another one given its pid later is not mistaken for it: "pid:start time".

`up` hands its own to every process it starts (DIFY_LOCAL_SUPERVISOR), and a lock's holder writes
its own into the lock file (runner.state_access).
"""

from __future__ import annotations

import os

import psutil

SAME_START = 0.05  # seconds: psutil reads the start time in clock ticks (1/100 s)


def identity_of(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{psutil.Process(pid).create_time()}"


def pid_of(identity: str) -> int | None:
    pid = identity.partition(":")[0]
    return int(pid) if pid.isdigit() else None


def alive(identity: str) -> bool:
    """Whether the process named by `identity` still runs (a zombie has exited already)."""
    pid = pid_of(identity)
    try:
        started = float(identity.partition(":")[2])
        process = psutil.Process(pid) if pid is not None else None
        return process is not None and abs(process.create_time() - started) < SAME_START \
            and process.status() != psutil.STATUS_ZOMBIE
    except (ValueError, psutil.Error):
        return False
