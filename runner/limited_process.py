"""Running one parser or template in a child process with limits on its memory, CPU time and
wall time, and on the size of what it returns: whatever the input makes the code do (a zip bomb,
a regular expression that backtracks, a template that doubles a string forty times), the worker
that asked keeps running and gets one line saying which limit was reached.

The child is a fork of the caller, so it has the function and its arguments already (nothing is
pickled, and nothing is imported again). It closes every inherited descriptor but its pipe and
the standard streams, resets the signals the worker handles, dies with its parent
(PR_SET_PDEATHSIG), and sets its own limits: address space (what it has mapped at the fork plus
`memory`), CPU seconds, no core file. It writes the function's result (or its error) as JSON to
the pipe and leaves with os._exit: no atexit handler, no flush of buffers it shares with the
parent. The parent reads at most `max_result` bytes and kills the child at the wall-time deadline.

Forking a threaded process is safe here because the child runs only the function: the modules
it needs are imported by the caller before the fork (an import lock held by another thread would
otherwise hang it), malloc is fork-safe in glibc, and logging resets its locks at a fork. Where
there is no fork (Windows) the function runs in the caller, bounded only by its own checks.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

# Python 3.12+ warns at every fork of a threaded process; the paragraph above says why this one is safe.
warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks", category=DeprecationWarning)

MEMORY_EXIT = 70  # the child's exit status when it ran out of memory before it could report
PR_SET_PDEATHSIG = 1
SIGNALS_RESET = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCHLD")
CAN_FORK = hasattr(os, "fork") and sys.platform != "win32"


@dataclass(frozen=True)
class Limits:
    memory: int  # bytes the child may map beyond what it had at the fork
    cpu_seconds: float
    max_result: int  # bytes of JSON the result may take
    memory_setting: str = ""  # the settings that set these, for the messages
    time_setting: str = ""

    @property
    def wall_seconds(self) -> float:
        # CPU time is the limit; on a busy machine the wall time to spend it is longer
        return self.cpu_seconds * 3 + 5


class LimitReached(Exception):
    """The child used more than a limit allows; the message names the limit and its setting."""


class ChildError(Exception):
    """The function raised in the child: `kind` is the exception's class name, the message its text."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _address_space() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _near_memory_limit() -> bool:
    """Whether this process's peak address space came within 16 MB of its limit: a C library that
    ran out (lxml, zlib) reports its own error, not MemoryError, and this is what it was."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return False
    try:
        with open("/proc/self/status", "rb") as status:
            peak = next(line for line in status if line.startswith(b"VmPeak:"))
    except (OSError, StopIteration):
        return False
    return int(peak.split()[1]) * 1024 >= soft - 16 * 1024 * 1024


def _set_limits(limits: Limits) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu = max(1, int(limits.cpu_seconds + 0.999))
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1 if hard == resource.RLIM_INFINITY else min(hard, cpu + 1)))
    mapped = _address_space()
    if mapped is not None:  # Linux; macOS does not enforce RLIMIT_AS
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        wanted = mapped + limits.memory
        resource.setrlimit(resource.RLIMIT_AS, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                hard))


def _child(function: Callable[..., Any], args: tuple, limits: Limits, write_end: int, parent: int) -> None:
    """In the child: never returns."""
    status = 0
    try:
        for name in SIGNALS_RESET:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_DFL)
        if sys.platform.startswith("linux"):
            try:
                ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            except (OSError, AttributeError):
                pass
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)
        os.closerange(3, write_end)
        os.closerange(write_end + 1, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 4096)
        _set_limits(limits)
        try:
            reply: dict[str, Any] = {"result": function(*args)}
        except MemoryError:
            reply = {"memory": True}
        except RecursionError as error:
            reply = {"error": ["RecursionError", f"it nests too deeply ({error})"]}
        except Exception as error:  # reported to the parent, which raises ChildError
            reply = {"memory": True} if _near_memory_limit() else {"error": [type(error).__name__, str(error)]}
        data = json.dumps(reply, ensure_ascii=False, default=str, allow_nan=False).encode("utf-8", "replace")
        view = memoryview(data)
        while view:
            view = view[os.write(write_end, view[:1 << 20]):]
    except MemoryError:
        status = MEMORY_EXIT
    except BaseException:  # anything else: the parent reports the child's end without a result
        status = 1
    finally:
        os._exit(status)


def _read(read_end: int, pid: int, limits: Limits, what: str) -> bytes:
    deadline = time.monotonic() + limits.wall_seconds
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            raise LimitReached(f"{what} took longer than {limits.wall_seconds:g} s{_setting(limits.time_setting)}")
        ready, _, _ = select.select([read_end], [], [], min(left, 1.0))
        if not ready:
            continue
        chunk = os.read(read_end, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limits.max_result:
            os.kill(pid, signal.SIGKILL)
            raise LimitReached(f"{what} produced more than {limits.max_result} bytes")
        chunks.append(chunk)


def _setting(name: str) -> str:
    return f" ({name})" if name else ""


def _wait(pid: int) -> int | None:
    """The child's wait status; None when something else reaped it first (a SIGCHLD handler)."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None


def run(function: Callable[..., Any], args: tuple, limits: Limits, what: str) -> Any:
    """`function(*args)` run in a limited child; its JSON-able result. Raises LimitReached (naming
    the limit) or ChildError (the function's own exception, by class name and message)."""
    if not CAN_FORK:
        return function(*args)
    read_end, write_end = os.pipe()
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError as error:  # EAGAIN: the user's process limit; ENOMEM
        os.close(read_end)
        os.close(write_end)
        raise LimitReached(f"{what} could not start its process: {error.strerror}") from None
    if pid == 0:
        os.close(read_end)
        _child(function, args, limits, write_end, parent)
    os.close(write_end)
    try:
        raw = _read(read_end, pid, limits, what)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        _wait(pid)
        raise
    finally:
        os.close(read_end)
    status = _wait(pid)
    if status is not None and os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        if number == signal.SIGXCPU:
            raise LimitReached(f"{what} took more than {limits.cpu_seconds:g} s of CPU{_setting(limits.time_setting)}")
        if number == signal.SIGKILL:  # the CPU limit's hard end, or the kernel out of memory
            raise LimitReached(f"{what} was killed (more than {limits.cpu_seconds:g} s of CPU, or the machine out "
                               f"of memory){_setting(limits.time_setting)}")
        raise LimitReached(f"{what} crashed ({signal.Signals(number).name})")
    exit_status = os.WEXITSTATUS(status) if status is not None else None
    if exit_status == MEMORY_EXIT or raw.startswith(b'{"memory"'):
        raise LimitReached(f"{what} needed more than {limits.memory // (1024 * 1024)} MB of memory"
                           f"{_setting(limits.memory_setting)}")
    if not raw:
        raise LimitReached(f"{what} ended without a result (exit status {exit_status})")
    reply = json.loads(raw)
    if "error" in reply:
        raise ChildError(*reply["error"])
    return reply["result"]
