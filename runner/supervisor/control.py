"""The control socket: how `dify-local ps|restart|stop|start|logs|down` reach a running `up`.

A Unix socket in the state folder, readable and writable by its owner only. One JSON object per
line: the client sends a request, the supervisor answers with one object, or (`logs` with
follow) with a stream of lines until the client goes away.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import stat
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from runner import safe_files, strict_json
from runner.errors import StateError
from runner.state import StatePaths

SOCKET_NAME = StatePaths.control_socket.relative.name  # for runner.supervisor.manager, which joins it itself
MAX_INFO = 1024 * 1024  # bytes: supervisor.json is a pid and a few settings
# A request is one short line (a command, a process name or two); it must come soon after connecting.
# Owner-only socket, but a stuck or broken client must not hold a thread and unbounded memory.
MAX_REQUEST = 64 * 1024
REQUEST_DEADLINE = 10.0  # seconds
SUN_PATH_LIMIT = 100  # bytes; Linux allows 108 in sockaddr_un


class NotRunning(Exception):
    """No supervisor answers for this state folder."""


@contextlib.contextmanager
def reachable(path: Path) -> Iterator[str]:
    """A path to bind or connect to, short enough for a Unix socket address.

    A deep state folder (a temporary folder, a long home) can exceed the limit; the socket then
    goes through /proc/self/fd/N/, N being an open descriptor of its folder.
    """
    text = str(path)
    if len(os.fsencode(text)) < SUN_PATH_LIMIT:
        yield text
        return
    descriptor = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        yield f"/proc/self/fd/{descriptor}/{path.name}"
    finally:
        os.close(descriptor)


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message, default=str).encode() + b"\n")


class _Handler(socketserver.StreamRequestHandler):
    server: "ControlServer"

    def handle(self) -> None:
        self.connection.settimeout(REQUEST_DEADLINE)
        try:
            line = self.rfile.readline(MAX_REQUEST + 1)
        except (TimeoutError, OSError):
            return  # nothing (or not a whole line) in time: nobody waits for an answer
        if len(line) > MAX_REQUEST:
            _send(self.connection, {"ok": False, "error": f"the request is over {MAX_REQUEST} bytes"})
            return
        try:
            request = strict_json.loads(line or b"{}")
        except ValueError:
            _send(self.connection, {"ok": False, "error": "the request is not JSON"})
            return
        self.connection.settimeout(None)  # answers and `logs -f` go at the client's pace
        if not isinstance(request, dict):
            _send(self.connection, {"ok": False, "error": "the request must be a JSON object"})
            return
        try:
            if request.get("command") == "logs" and request.get("follow"):
                self.server.follow(request, lambda line: _send(self.connection, line))
            else:
                _send(self.connection, self.server.answer(request))
        except (BrokenPipeError, ConnectionResetError):
            pass


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, answer: Callable[[dict], dict], follow: Callable[[dict, Callable], None]):
        self.path = path
        self.answer = answer
        self.follow = follow
        # a stale socket of a supervisor that did not stop cleanly (a link is removed, never followed)
        safe_files.remove(path.parent, path.name)
        previous = os.umask(0o177)  # the socket is created owner-only: no window where others can connect
        try:
            with reachable(path) as address:
                super().__init__(address, _Handler)
        finally:
            os.umask(previous)
        if not stat.S_ISSOCK(os.lstat(path).st_mode):  # replaced meanwhile: never chmod through a link
            raise safe_files.LinkInStateFolder(path, path.parent)
        os.chmod(path, 0o600)
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="control-socket", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _connect(state_dir: Path, timeout: float | None) -> socket.socket:
    path = StatePaths(state_dir).control_socket
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise NotRunning(f"nothing is running for {state_dir} (no control socket)") from None
    if stat.S_ISLNK(mode):  # connect() would follow it to whatever socket it names
        raise NotRunning(str(safe_files.LinkInStateFolder(path, state_dir)))
    if not stat.S_ISSOCK(mode):
        raise NotRunning(f"nothing is running for {state_dir} ({path} is not a socket)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with reachable(path) as address:
            sock.connect(address)
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        raise NotRunning(f"nothing is running for {state_dir} (its control socket is stale)") from None
    except PermissionError:
        sock.close()
        raise NotRunning(f"the control socket {path} belongs to another user") from None
    return sock


def request(state_dir: Path, message: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    with _connect(state_dir, timeout) as sock:
        _send(sock, message)
        with sock.makefile("rb") as replies:
            line = replies.readline()
    if not line:
        raise NotRunning(f"the supervisor for {state_dir} closed the connection without answering")
    return json.loads(line)


def stream(state_dir: Path, message: dict[str, Any]) -> Iterator[dict[str, Any]]:
    with _connect(state_dir, None) as sock:
        _send(sock, message)
        with sock.makefile("rb") as replies:
            for line in replies:
                yield json.loads(line)


def write_info(state_dir: Path, info: dict[str, Any]) -> None:
    """The running `up`: its pid, and the settings its command line gave (owner-only: a password
    given with --broker-password is among them)."""
    paths = StatePaths(state_dir)
    safe_files.write_atomic(paths.root, paths.supervisor_info, json.dumps(info, indent=2).encode())


def read_info(state_dir: Path) -> dict[str, Any] | None:
    paths = StatePaths(state_dir)
    try:
        info = json.loads(safe_files.read_bytes(paths.root, paths.supervisor_info, limit=MAX_INFO))
    except (OSError, ValueError, StateError):  # none, unreadable, a link (never followed), or no state folder
        return None
    return info if isinstance(info, dict) else None


def running_stack_settings(state_dir: Path) -> tuple[int, dict[str, str]] | None:
    """The pid of the `up` running for this state folder and where its broker and API are
    (Settings.stack_address), so commands from another terminal look at the stack that runs."""
    info = read_info(state_dir)
    pid = info.get("pid") if info else None
    if not isinstance(pid, int) or not 0 < pid < 2**31 or not isinstance(info.get("settings"), dict):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a stale file of an `up` that did not stop cleanly
    except PermissionError:
        pass
    return info["pid"], {str(name): str(value) for name, value in info["settings"].items()}


def moved_api(state_dir: Path) -> tuple[int, int] | None:
    """(the port asked for, the port taken) when the running `up` put our API on a free port because
    the project's own web process listens on ours (runner.supervisor.api_place)."""
    info = read_info(state_dir) or {}
    moved = info.get("api_moved")
    if not isinstance(moved, dict) or running_stack_settings(state_dir) is None:
        return None
    asked, taken = moved.get("from"), moved.get("to")
    if not all(isinstance(port, int) and 0 < port < 65536 for port in (asked, taken)):
        return None
    return asked, taken


def remove_info(state_dir: Path) -> None:
    paths = StatePaths(state_dir)
    try:
        safe_files.remove(paths.root, paths.supervisor_info)
    except (OSError, StateError):
        pass


def forget(state_dir: Path) -> None:
    """What a killed `up` left of itself: its info file and its socket (by its watchdog, which
    holds the `up`'s lock: no new `up` has made its own yet)."""
    remove_info(state_dir)
    paths = StatePaths(state_dir)
    try:
        safe_files.remove(paths.root, paths.control_socket)
    except (OSError, StateError):
        pass
