"""Test helpers: real processes, real ports, waits with deadlines (never bare sleeps)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import psutil

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def dify_local() -> list[str]:
    script = BIN / "dify-local"
    return [str(script)] if script.exists() else [sys.executable, "-m", "runner"]


_GIVEN_PORTS: set[int] = set()
# Picked at random below the kernel's ephemeral range (32768–60999 here), where no outgoing connection
# or port-0 listener lands between the pick and the bind. Under pytest-xdist each worker takes only
# the ports of its own residue class, so two workers are never handed the same one. (Not bind(0):
# since Linux 4.6 it hands out odd ports only while any is free, so a worker wanting even ones spun.)
PORTS = range(20000, 32768)
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
_RANDOM = random.Random()


def free_port() -> int:
    """A free loopback port never handed out before in this session: two picks in a row can
    otherwise be the same port (a project's broker and API on one port), or one a previous test's
    lingering process still holds."""
    for _ in range(10_000):
        port = _RANDOM.randrange(PORTS.start + _WORKER, PORTS.stop, _WORKERS)
        if port in _GIVEN_PORTS:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN_PORTS.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {PORTS.start}–{PORTS.stop - 1} for this test worker")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def base_env(**extra: str) -> dict[str, str]:
    """The environment for a child: this test's virtualenv first on PATH, no inherited settings."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("CELERY_", "REDIS_", "DIFY_", "ENABLE_", "LOG_", "MODE", "MIGRATION_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Http:
    def __init__(self, base: str):
        self.base = base

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict | None = None, timeout: float = 10) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, payload = error.code, error.read()
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload.decode("utf-8", "replace")

    def status(self, path: str) -> int:
        """The status of GET path, or 0 while nothing answers (for waits)."""
        try:
            return self.get(path, timeout=5)[0]
        except (urllib.error.URLError, OSError):
            return 0

    def get(self, path: str, **kwargs) -> tuple[int, Any]:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs) -> tuple[int, Any]:
        return self.request("POST", path, body, **kwargs)


class Proc:
    """A process this test started: output collected, stopped and its whole tree reaped at the end."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]):
        self.argv = argv
        self.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[str] = []
        self.seen: set[int] = {self.popen.pid}  # every pid of this tree observed while it ran
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in iter(self.popen.stdout.readline, b""):
            with self._lock:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def output(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 60) -> re.Match:
        regex = re.compile(pattern)

        def found():
            if self.popen.poll() is not None and not regex.search(self.output):
                raise AssertionError(f"{self.argv} exited ({self.popen.returncode}) before {pattern!r}:\n{self.output}")
            return regex.search(self.output)
        try:
            return wait_until(found, timeout, f"{pattern!r} in the output of {self.argv}")
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- output ---\n{self.output}") from None

    def tree(self) -> set[int]:
        """Pids of the process and all its descendants now (and remembered)."""
        try:
            root = psutil.Process(self.popen.pid)
            pids = {root.pid} | {child.pid for child in root.children(recursive=True)}
        except psutil.NoSuchProcess:
            pids = set()
        self.seen |= pids
        return pids

    def signal(self, signum: int) -> None:
        self.tree()
        self.popen.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        return self.popen.wait(timeout)

    def alive(self) -> list[int]:
        survivors = []
        for pid in self.seen:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    survivors.append(pid)
            except psutil.NoSuchProcess:
                pass
        return survivors

    def cleanup(self) -> None:
        self.tree()
        for pid in self.seen:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


def require_compiled_loop() -> None:
    """Skip without the broker's compiled read loop (runner/broker/_session.c), or fail where it
    is required (DIFY_LOCAL_REQUIRE_COMPILED=1, as CI sets it: a build that silently fell back to
    the Python loop would pass every test and be slower)."""
    import pytest

    from runner.broker.session import compiled_session

    session, why = compiled_session()
    if session is None:
        if os.environ.get("DIFY_LOCAL_REQUIRE_COMPILED") == "1":
            pytest.fail(f"the broker's compiled read loop is required here (DIFY_LOCAL_REQUIRE_COMPILED=1): {why}")
        pytest.skip(f"the broker's compiled read loop is not built: {why}")
