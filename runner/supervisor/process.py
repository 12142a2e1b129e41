"""One supervised process: spawned in its own session, its output streamed as honcho messages,
stopped with its own signal sequence, and never leaving anything of its process group behind."""

from __future__ import annotations

import collections
import datetime
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from queue import Queue
from typing import Any

from honcho.printer import Message

from runner.process_env import CHANNEL_FD, LISTEN_FD
from runner.reload.channel import Channel
from runner.supervisor.listeners import ApiListener
from runner.supervisor.options import ProcessOptions
from runner.supervisor.procfile import ProcessSpec
from runner.supervisor.tree import descendants, kill

TAIL_LINES = 200
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def shell_features(command: str) -> tuple[bool, bool]:
    """(compound, needs a shell): read outside quotes, as sh reads it.

    Compound: control operators (; & | ( ) newline) join several commands. Needs a shell:
    expansions ($ and backticks, also inside double quotes), globs, ~, redirections, comments.
    """
    compound = shell = False
    quote = ""
    escaped = False
    for char in command:
        if escaped:
            escaped = False
            continue
        if char == "\\" and quote != "'":
            escaped = True
            continue
        if quote:
            if char == quote:
                quote = ""
            elif quote == '"' and char in "$`":
                shell = True
            continue
        if char in "'\"":
            quote = char
        elif char in ";&|()\n":
            compound = True
        elif char in "$`*?[]~<>#":
            shell = True
    return compound, shell


def launch(command: str) -> tuple[list[str], dict[str, str]]:
    """How to run a Procfile command: argv, and variables it assigns before its program.

    A plain command runs directly, and a single command that needs a shell runs through `exec`,
    so signals reach the program itself rather than a shell around it. Only compound commands
    keep a shell between the supervisor and their programs.
    """
    compound, shell = shell_features(command)
    if compound:
        return ["/bin/sh", "-c", command], {}
    words = shlex.split(command)
    assignments = {}
    while words and ASSIGNMENT.match(words[0]):
        name, _, value = words.pop(0).partition("=")
        assignments[name] = value
    if not shell:
        return words, assignments
    if assignments:  # `FOO=1 exec …` would need the assignments re-quoted: keep the shell
        return ["/bin/sh", "-c", command], {}
    return ["/bin/sh", "-c", f"exec {command}"], {}


@dataclass(frozen=True)
class StopPolicy:
    """How a process is asked to stop: signals in order, each with the seconds to wait after it."""

    steps: tuple[tuple[signal.Signals, float], ...]

    @classmethod
    def for_process(cls, role: str | None, options: ProcessOptions, grace: float) -> "StopPolicy":
        first = options.stop_signal or signal.SIGTERM
        timeout = options.stop_timeout if options.stop_timeout is not None else grace
        if role == "worker":
            # Celery: TERM is a warm shutdown (running tasks finish, prefetched ones go back to the
            # queue), QUIT a cold one; sent to the main process only, which manages its pool.
            return cls(((first, timeout), (signal.SIGQUIT, 5.0)))
        return cls(((first, timeout),))


@dataclass(frozen=True)
class Exited:
    name: str
    returncode: int
    pid: int


@dataclass(frozen=True)
class Said:
    """A message a process of ours sent over its channel (runner.reload.child)."""

    pid: int
    message: dict


class ManagedProcess:
    """A Procfile process and the OS process currently running it (if any)."""

    def __init__(self, spec: ProcessSpec, options: ProcessOptions, env: dict[str, str], cwd: str, events: Queue,
                 colour: Any, grace: float, with_channel: bool = False):
        self.spec = spec
        self.options = options
        self.env = env
        self.cwd = cwd
        self.events = events
        self.colour = colour
        self.grace = grace
        self.with_channel = with_channel
        self.channel: Channel | None = None
        self.listener: ApiListener | None = None  # the API's socket, held by the supervisor
        self.stop_policy = StopPolicy.for_process(spec.role, options, grace)
        self.popen: subprocess.Popen | None = None
        self.started_at: float = 0.0
        self.started_wall: float = 0.0
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.returncode: int | None = None
        self._reader: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def twin(self) -> "ManagedProcess":
        """Another process for the same Procfile line (one to take over from this one)."""
        twin = ManagedProcess(self.spec, self.options, self.env, self.cwd, self.events, self.colour, self.grace,
                              self.with_channel)
        twin.listener = self.listener
        return twin

    def start(self, extra_env: dict[str, str] | None = None) -> None:
        self.returncode = None
        argv, assignments = launch(self.spec.command)
        env = {**self.env, **(extra_env or {}), **assignments}
        theirs = None
        passed = []
        if self.with_channel:
            self.channel, theirs = Channel.pair()
            env[CHANNEL_FD] = str(theirs.fileno())
            passed.append(theirs.fileno())
        listening = self.listener.open() if self.listener is not None else None
        if listening is not None:
            env[LISTEN_FD] = str(listening.fileno())
            passed.append(listening.fileno())
        try:
            self.popen = subprocess.Popen(
                argv, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True, pass_fds=tuple(passed))
        except OSError:
            if self.channel is not None:
                self.channel.close()
            raise
        finally:
            if theirs is not None:
                theirs.close()
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self._reader = threading.Thread(target=self._read, args=(self.popen,), name=f"read-{self.name}",
                                        daemon=True)
        self._reader.start()
        if self.channel is not None:
            threading.Thread(target=self._listen, args=(self.channel, self.popen.pid), name=f"listen-{self.name}",
                             daemon=True).start()

    def tell(self, event: str, **data: Any) -> bool:
        """Send a message over the channel; False if there is none or the process is gone."""
        return self.channel is not None and self.channel.send(event, **data)

    def _listen(self, channel: Channel, pid: int) -> None:
        for message in channel.messages():
            self._emit(Said(pid, message), kind="said")
        channel.close()

    def _emit(self, data: Any, kind: str = "line") -> None:
        self.events.put(Message(type=kind, data=data, time=datetime.datetime.now(), name=self.name,
                                colour=self.colour))

    def _read(self, popen: subprocess.Popen) -> None:
        assert popen.stdout is not None
        for raw in iter(popen.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.tail.append(line)
            self._emit(line)
        popen.stdout.close()
        returncode = popen.wait()
        self.returncode = returncode
        self._emit(Exited(self.name, returncode, popen.pid), kind="exit")

    def signal(self, signum: int) -> None:
        if self.running():
            try:
                os.kill(self.popen.pid, signum)
            except ProcessLookupError:
                pass

    def kill_group(self) -> None:
        """SIGKILL everything left in the process's group (its children included)."""
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, force: threading.Event | None = None) -> int | None:
        """Stop with the policy's signals, then clear the group and every descendant; returns the
        exit status."""
        if self.popen is None:
            return None
        tree = descendants(self.popen.pid) if self.running() else []
        for signum, wait in self.stop_policy.steps:
            if not self.running() or (force and force.is_set()):
                break
            self.signal(signum)
            deadline = time.monotonic() + wait
            while self.running() and time.monotonic() < deadline and not (force and force.is_set()):
                time.sleep(0.05)
        if self.running():
            self.kill_group()
        self.popen.wait()
        self.kill_group()  # whatever the process left behind in its group
        kill(tree)  # and anything of its tree that had left the group (setsid)
        if self._reader is not None:
            self._reader.join(timeout=2)
        return self.popen.returncode
