"""The API's listening socket, opened by `up` and handed to every API process it starts.

An API process that is replaced (a reload, a restart) lets go of nothing: connections that arrive
while no API process accepts wait in the socket's backlog and are served by the next one, instead
of being refused. Stopping the API on purpose (`dify-local stop api`) closes the socket, so
clients are refused as they would be with no API at all; starting it opens the socket again.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("dify_local.supervisor")

BACKLOG = 128


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host is written as one, as werkzeug chose)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


class ApiListener:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.sock: socket.socket | None = None

    def open(self) -> socket.socket | None:
        """The socket, opened if it is not; None if it cannot be (the API then binds it itself,
        and says why if it cannot either)."""
        if self.sock is None:
            try:
                self.sock = listen(self.host, self.port)
            except OSError as error:
                log.debug("cannot hold %s:%s for the API: %s", self.host, self.port, error)
                return None
            self.sock.set_inheritable(True)
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
