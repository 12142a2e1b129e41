"""The embedded broker: fakeredis' command core behind a TCP server that behaves as Redis does.

fakeredis' TCP server as shipped (2.x) differs from Redis in four ways that matter to Celery, and
this module changes exactly those:

- it never sets TCP_NODELAY, so each pipelined round trip waits for the peer's delayed ACK
  (~40 ms here: about 11 Celery tasks/s end to end);
- it accepts every command from clients that never sent AUTH, even with a password configured;
- it closes the connection after any error reply, so the NOSCRIPT that redis-py expects before
  falling back to EVAL looks to kombu like a lost broker;
- a client that disconnects while its BRPOP waits stays blocked in the broker, and the next
  message pushed is popped for it and lost: a worker killed with kill -9 takes one task with it.
  Redis drops a disconnected client's blocking state; here a blocked pop first checks its peer.

Speed and durability beyond that are the broker issue's work.
"""

from __future__ import annotations

import hmac
import logging
import select
import socket
from typing import Any

import redis
from fakeredis import TcpFakeServer
from fakeredis._clients._sync import FakeRedisConnection
from fakeredis._clients._tcp_server import _INTERNAL_CONNECTION_KWARGS, TCPFakeRequestHandler
from fakeredis._helpers import SimpleError
from fakeredis._socket import FakeSocket

log = logging.getLogger("dify_local.broker")

NOAUTH = "NOAUTH Authentication required."
NOAUTH_HELLO = ("NOAUTH HELLO must be called with the client already authenticated, otherwise the "
                "HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and "
                "select the RESP protocol version at the same time")
WRONGPASS = "WRONGPASS invalid username-password pair or user is disabled."
SYNTAX = "ERR syntax error"


def peer_closed(connection: socket.socket) -> bool:
    """Has the client hung up? (Readable, and reading without consuming finds the end.)"""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class BrokerSocket(FakeSocket):
    """fakeredis' socket for one TCP client: with a password, it refuses every command but AUTH,
    HELLO … AUTH and QUIT until AUTH succeeds; a blocking pop never serves a client that left."""

    def __init__(self, *args: Any, password: bytes | None, tcp: socket.socket, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._password = password
        self._authenticated = password is None
        self._tcp = tcp

    def _blocking(self, timeout: Any, func: Any, shape: Any = None) -> Any:
        def attempt(first_pass: bool) -> Any:
            # Woken because data arrived: if the client is gone, leave the data for a live one
            # (None means "nothing yet": the wait goes on until its timeout, then the reply fails).
            if not first_pass and peer_closed(self._tcp):
                return None
            return func(first_pass)

        return super()._blocking(timeout, attempt, shape)

    def _check(self, username: bytes | None, password: bytes) -> bool:
        ok = (username in (None, b"default")) and hmac.compare_digest(password, self._password)
        if ok:
            self._authenticated = True
        return ok

    def _refuse(self, message: str) -> None:
        # A SimpleError travels to the TCP handler as a reply value and is written verbatim.
        self.put_response(SimpleError(message))

    def _process_command(self, fields: list[bytes]) -> None:
        if not fields:
            return
        if self._password is None:
            super()._process_command(fields)
            return
        name = fields[0].lower()
        if name == b"auth":
            arguments = fields[1:]
            if len(arguments) not in (1, 2):
                self._refuse("ERR wrong number of arguments for 'auth' command")
            elif self._check(arguments[0] if len(arguments) == 2 else None, arguments[-1]):
                self.put_response(b"OK")
            else:
                self._refuse(WRONGPASS)
            return
        if name == b"hello":
            arguments = list(fields[1:])
            upper = [argument.upper() for argument in arguments]
            if b"AUTH" in upper:
                at = upper.index(b"AUTH")
                if at + 2 >= len(arguments):
                    self._refuse(SYNTAX)
                    return
                if not self._check(arguments[at + 1], arguments[at + 2]):
                    self._refuse(WRONGPASS)
                    return
                del arguments[at:at + 3]
            elif not self._authenticated:
                self._refuse(NOAUTH_HELLO)
                return
            super()._process_command([fields[0], *arguments])
            return
        if not self._authenticated and name != b"quit":
            self._refuse(NOAUTH)
            return
        super()._process_command(fields)


class BrokerConnection(FakeRedisConnection):
    """The server-side connection behind one TCP client; builds a BrokerSocket."""

    broker_password: bytes | None = None
    tcp: socket.socket

    def _connect(self) -> FakeSocket:
        return BrokerSocket(
            self._server,
            client_class=self._client_class,
            db=self.db,
            lua_modules=self._lua_modules,
            client_info=self._client_info,
            password=self.broker_password,
            tcp=self.tcp,
        )


class BrokerRequestHandler(TCPFakeRequestHandler):
    server: "EmbeddedBroker"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Replace the connection the parent made with one that enforces the password.
        connection = BrokerConnection(
            server=self.server.fake_server,
            writer=self.writer,
            client_info={
                "laddr": self.connection.getsockname(),
                "addr": self.connection.getpeername(),
                "fd": self.connection.fileno(),
            },
            **_INTERNAL_CONNECTION_KWARGS,
        )
        connection.broker_password = self.server.password
        connection.tcp = self.connection
        self.current_client = connection
        self.server.clients[self.client_address] = connection
        log.debug("client %s:%s connected", *self.client_address[:2])

    def handle(self) -> None:
        # fakeredis' loop, except that an error reply is written and the connection stays open.
        while not self.server._shutdown_event.is_set():
            try:
                if self.current_client.can_read():
                    try:
                        response = self.current_client.read_response()
                    except (redis.ResponseError, redis.AuthenticationError) as error:
                        self.writer.dump(error)
                        continue
                    self.writer.dump(response)
                    continue
                data = self.rfile.readline()
                if data == b"":
                    readable, _, _ = select.select([self.connection], [], [], 0.01)
                    if not readable:
                        continue
                    data = self.rfile.readline()
                    if data == b"":
                        break
                try:
                    self.current_client.get_socket().sendall(data)
                except SimpleError as error:
                    # A protocol error leaves the parser unusable; Redis, too, replies and closes.
                    self.writer.dump(SimpleError(f"ERR Protocol error: {error.value.removeprefix('ERR ')}"))
                    break
            except (ConnectionError, OSError):
                break
            except Exception:  # a fault in the command core: log it and drop this client only
                log.exception("error serving %s:%s", *self.client_address[:2])
                break

    def finish(self) -> None:
        log.debug("client %s:%s disconnected", *self.client_address[:2])
        super().finish()


class EmbeddedBroker(TcpFakeServer):
    """A Redis-protocol server on one address, requiring `password` when given."""

    def __init__(self, host: str, port: int, password: str | None):
        self.password = password.encode() if password else None
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), server_version=(7, 4))
        self.RequestHandlerClass = BrokerRequestHandler
        self.daemon_threads = True
