"""The channel between `up` and one process of ours: JSON objects, one per line, over a socket pair.

The process says what happens to it ({"event": "loaded"}, "serving", "failed", "imports", …); `up`
tells it when to go on ({"event": "load"} to a standby, "serve" to a process taking over). A
socket pair rather than the process's stdout: output stays the user's, and the messages need no
escaping or parsing out of it.
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Any, Iterator

MAX_LINE = 16 * 1024 * 1024  # an import report of a few thousand module names is ~100 kB


class Channel:
    """One end of the pair. `send` may be called from any thread; `messages` from one."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()
        self._file = sock.makefile("rb")

    @classmethod
    def pair(cls) -> tuple["Channel", socket.socket]:
        """Our end, and the socket to pass to the child (inheritable, to be closed here once it runs)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.set_inheritable(True)
        return cls(ours), theirs

    def send(self, event: str, **data: Any) -> bool:
        """False if the other end is gone."""
        line = json.dumps({"event": event, **data}, separators=(",", ":")).encode() + b"\n"
        try:
            with self._lock:
                self.sock.sendall(line)
            return True
        except OSError:
            return False

    def messages(self) -> Iterator[dict[str, Any]]:
        """Messages until the other end closes; a line that is not a JSON object is skipped."""
        while True:
            try:
                line = self._file.readline(MAX_LINE)
            except (OSError, ValueError):
                return
            if not line:
                return
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and isinstance(message.get("event"), str):
                yield message

    def wait_for(self, event: str) -> dict[str, Any] | None:
        """The next message of this kind (others are dropped); None once the other end has closed."""
        for message in self.messages():
            if message["event"] == event:
                return message
        return None

    def close(self) -> None:
        for closing in (self._file.close, self.sock.close):
            try:
                closing()
            except OSError:
                pass
