"""Clients that connect to an HTTP server and stall, each in one of the ways a slow or hostile client
does: the tests of the API's server and bench/api_slow_clients.py use them."""

from __future__ import annotations

import socket
import threading

# what each kind sends at once, then (`trickled`) one byte of every few seconds
KINDS = {
    "silent": (b"", None),  # connects, sends nothing
    "headers": (b"POST /v1/tasks/send_mail_task HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n",
                None),  # headers without the blank line that ends them
    "slowloris": (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", b"a"),  # a header that never ends
    "slow-body": (b"POST /v1/tasks/send_mail_task HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n[", b" "),  # a body slower than its Content-Length
}


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closed (or answered on) this connection; False while it waits on us.
    (`sock` in blocking mode: with a timeout, Python waits that long before it tries to read.)"""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # b"": closed; a byte: an answer
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


class StalledClients:
    """`count` connections to 127.0.0.1:`port` stalled the `kind` way until close(); the trickling
    kinds send their next byte every `every` seconds."""

    def __init__(self, port: int, kind: str, count: int, every: float = 2.0):
        self.first, self.trickled = KINDS[kind]
        self.every = every
        self.socks: list[socket.socket] = []
        self._stop = threading.Event()
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.settimeout(None)  # blocking: MSG_DONTWAIT then means what it says (see closed_by_peer)
                if self.first:
                    sock.sendall(self.first)
                self.socks.append(sock)
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        if self.trickled:
            self._thread.start()

    def _trickle(self) -> None:
        while not self._stop.wait(self.every):
            for sock in self.socks:
                try:
                    sock.send(self.trickled, socket.MSG_DONTWAIT)
                except OSError:  # closed by the server: what the tests wait for
                    pass

    def open(self) -> int:
        """How many of them the server still keeps open, waiting on them."""
        return sum(not closed_by_peer(sock) for sock in self.socks)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        for sock in self.socks:
            sock.close()
