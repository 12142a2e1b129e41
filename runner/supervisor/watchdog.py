"""What stops everything `up` started once `up` is gone, however it went: kill -9 included.

`up` forks the watchdog before it starts anything (and before it has threads). The watchdog leaves
`up`'s session, so Ctrl-C in the terminal and signals to `up`'s group do not reach it, and blocks
reading a pipe whose other end only `up` holds: the kernel closes it when `up` dies, and the read
returns. Then it finds what `up` started, its children and their daemons included:

- the processes of `up`'s cgroup, where there is one (runner.supervisor.cgroup): nothing born in
  it can leave it;
- and the processes of this user whose environment holds `up`'s identity (DIFY_LOCAL_SUPERVISOR,
  which `up` gives every process it starts and children inherit): the only way where there is no
  cgroup, and enough for everything that keeps its environment.

It sends SIGTERM to the topmost of them (the processes `up` started, and daemons: a warm stop, as
`up` would have asked; a worker's running tasks may finish), and after TERM_GRACE SIGKILL to all
that are left, so that within 5 s of `up`'s death nothing of it runs and its ports are free. Our
roles also stop themselves when `up` is gone (runner.roles.common), as before.

The watchdog keeps `up`'s lock on the state folder (it shares its open file) until it is done: a
new `up` waits for it instead of finding the ports taken. Should the watchdog die with `up`, the
next `up` on the folder does its work first (stop_leftovers). When `up` stops normally it leaves its
cgroup, says so over the pipe, and waits for the watchdog, which then only kills what `up`'s own
stop left (nothing, normally) and removes the cgroup.

PR_SET_PDEATHSIG was the other way: it reaches only direct children (a daemon is re-parented), it
fires when the thread that forked a child exits, and it kills at once, with no warm stop.
"""

from __future__ import annotations

import datetime
import gc
import os
import signal
import time
from pathlib import Path
from typing import Callable

import psutil

from runner.process_env import SUPERVISOR
from runner.process_identity import alive, pid_of
from runner.roles.common import BROKER_LAST
from runner.supervisor import control
from runner.supervisor.cgroup import PREFIX, Cgroup
from runner.supervisor.tree import name_process

TERM_GRACE = 3.0  # seconds the processes get to stop on SIGTERM before SIGKILL
KILL_WAIT = 1.5  # seconds for SIGKILL to take effect: TERM_GRACE + KILL_WAIT stays within 5 s
POLL = 0.05
CLEAN = b"."  # `up` stopped normally: what is left is only leftovers


def marked(identity: str, exclude: set[int]) -> set[int]:
    """Pids of this user's processes whose environment names `up` by its identity."""
    found = set()
    uid = os.geteuid()
    for process in psutil.process_iter():
        if process.pid in exclude:
            continue
        try:
            if uid not in process.uids()[:2]:
                continue
            if process.environ().get(SUPERVISOR) == identity:
                found.add(process.pid)
        except psutil.Error:  # gone, a zombie, or not ours to read
            continue
    return found


def _is_broker(pid: int) -> bool:
    """Our embedded broker (`dify-local serve broker`), which the others need while they stop."""
    try:
        argv = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return any(word == "serve" and following == "broker" for word, following in zip(argv, argv[1:], strict=False))


def _living(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                living.add(pid)
        except psutil.Error:
            continue
    return living


def _signal(pids: set[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except OSError:
            continue


class Sweep:
    """Finding and stopping what an `up` started (in the watchdog's process)."""

    def __init__(self, identity: str, cgroup: Cgroup | None, up_pid: int, say: Callable[[str], None]):
        self.identity = identity
        self.cgroup = cgroup
        self.up_pid = up_pid
        self.say = say
        self.exclude = {os.getpid(), up_pid}

    def members(self) -> set[int]:
        pids = marked(self.identity, self.exclude)
        if self.cgroup is not None:
            pids |= self.cgroup.members()
        return _living(pids - self.exclude)

    def kill(self, deadline: float) -> int:
        """SIGKILL what is left until nothing is (or the deadline); how many were killed."""
        killed: set[int] = set()
        while True:
            left = self.members()
            if not left or time.monotonic() > deadline:
                return len(killed)
            killed |= left
            if self.cgroup is not None:
                self.cgroup.kill()
            _signal(left, signal.SIGKILL)
            time.sleep(POLL)

    def after_death(self) -> None:
        """Stop as `up` would have (the broker last: a worker's warm stop gives its prefetched
        tasks back to it), within TERM_GRACE; then kill what is left."""
        began = time.monotonic()
        members = self.members()
        if not members:
            return
        tops = set()
        for pid in members:
            try:
                if psutil.Process(pid).ppid() not in members:
                    tops.add(pid)
            except psutil.Error:
                continue
        self.say(f"`up` (pid {self.up_pid}) is gone: stopping the {len(members)} processes it started "
                 f"(SIGTERM, then SIGKILL after {TERM_GRACE:.0f} s)")
        brokers = {pid for pid in tops if _is_broker(pid)}
        for stage, until in ((tops - brokers, BROKER_LAST), (brokers, TERM_GRACE)):
            _signal(stage, signal.SIGTERM)
            while _living(stage) and time.monotonic() < began + until:
                time.sleep(POLL)
        killed = self.kill(began + TERM_GRACE + KILL_WAIT)
        self.say(f"stopped the processes of `up` (pid {self.up_pid}) in {time.monotonic() - began:.1f} s"
                 + (f": {killed} had to be killed" if killed else ""))

    def after_stop(self) -> None:
        killed = self.kill(time.monotonic() + KILL_WAIT)
        if killed:
            self.say(f"killed {killed} process(es) that `up`'s stop left behind")


def stop_leftovers(state_dir: Path, say: Callable[[str], None]) -> None:
    """Stop what a previous `up` on this folder left running when its watchdog could not (killed
    with it, as `pkill -9 -f 'dify-local up'` does: the watchdog is a fork of `up`): found by the
    identity and cgroup that `up` recorded in supervisor.json. Called by a new `up` that holds the
    folder's lock, so the previous one has certainly stopped."""
    info = control.read_info(state_dir) or {}
    identity, recorded = info.get("identity"), info.get("cgroup")
    if not isinstance(identity, str) or pid_of(identity) is None or alive(identity):
        return
    cgroup = None
    if isinstance(recorded, str) and Path(recorded).name.startswith(PREFIX):
        cgroup = Cgroup(Path(recorded), Path(recorded).parent)
    Sweep(identity, cgroup, pid_of(identity), say).after_death()
    if cgroup is not None:
        cgroup.remove()
    control.forget(state_dir)


def _close_others(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                continue


def _say(text: str) -> None:
    """A line as `up`'s printer writes its own, to `up`'s output (the terminal, usually)."""
    line = f"{datetime.datetime.now():%H:%M:%S} system | {text}\n"
    try:
        os.write(1, line.encode("utf-8", "replace"))
    except OSError:  # nobody reads it any more
        pass


class Watchdog:
    """`up`'s side: start the watchdog, and at a normal stop, let it finish."""

    def __init__(self, identity: str, cgroup: Cgroup | None, state_dir: Path, keep: tuple[int, ...] = ()):
        self.identity = identity
        self.cgroup = cgroup
        self.state_dir = state_dir
        self.keep = keep  # descriptors the watchdog keeps open (the state folder's lock)
        self.pid: int | None = None
        self._pipe: int | None = None

    def start(self) -> int:
        up_pid = os.getpid()
        readable, writable = os.pipe()  # both close-on-exec: no child `up` starts inherits them
        pid = os.fork()
        if pid == 0:  # the watchdog
            status = 0
            try:
                os.close(writable)
                self._run(readable, up_pid)
            except BaseException as error:
                _say(f"the watchdog of `up` (pid {up_pid}) failed: {type(error).__name__}: {error}")
                status = 1
            finally:
                os._exit(status)
        os.close(readable)
        self.pid, self._pipe = pid, writable
        return pid

    def _run(self, readable: int, up_pid: int) -> None:
        gc.freeze()  # `up`'s objects stay as they are: none may close a descriptor number reused here
        os.setsid()
        name_process(b"up-watchdog")  # as `ps -o comm` and top show it (the command line is `up`'s)
        for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTSTP):
            signal.signal(signum, signal.SIG_IGN)
        _close_others({readable, *self.keep})
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        told = b""
        while True:
            chunk = os.read(readable, 64)
            if not chunk:
                break
            told = chunk[-1:]
        sweep = Sweep(self.identity, self.cgroup, up_pid, _say)
        if told == CLEAN:
            sweep.after_stop()
        else:
            sweep.after_death()
            control.forget(self.state_dir)  # `ps` then says nothing runs, not that a socket is stale
        if self.cgroup is not None:
            self.cgroup.remove()

    def finish(self, timeout: float = TERM_GRACE + KILL_WAIT) -> None:
        """`up` stops normally (it has left its cgroup): let the watchdog clear up, and reap it."""
        if self._pipe is None or self.pid is None:
            return
        try:
            os.write(self._pipe, CLEAN)
        except OSError:
            pass
        os.close(self._pipe)
        self._pipe = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped already
                return
            if pid:
                return
            time.sleep(0.01)
