"""One client's read loop: its commands parsed, the hot ones run on the fast path, the rest handed
to the server, the replies buffered until the end of the batch.

Two implementations with the same interface and the same behaviour: `CSession`, compiled from
`_session.c` when the package is built with a C compiler, and `PySession` below, the reference,
used where the extension is not built (or with DIFY_LOCAL_BROKER_COMPILED=false). Profiled under
Celery, the broker spent most of its own time in this loop's Python: the compiled one runs the
same steps in C (tests/test_broker_fast.py runs both against redis-server).

The interface, for `server.Connection` (which adds the asyncio callbacks) and the server:
attributes `server`, `engine` (the C loop's view of the server, None here), `sock`, `transport`,
`parked`, `closing`, `fast_multi`, `fast_ready`, `protocol`; methods `data_received(data)`,
`process()`, `reply(message)`, `send(data)`, `finish_fast_multi(name)`, `flush()`.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from fakeredis._helpers import SimpleError

from runner.broker.fast import NO_REPLY, OK, PUBSUB_ALLOWED, QUEUED, Defer
from runner.broker.resp import PROTOCOL_ERRORS, encode, reader_for

log = logging.getLogger("dify_local.broker")

API = 3  # the interface's version: a compiled extension built for another one is not used


class PySession:
    def __init__(self) -> None:
        self.server: Any = None
        self.engine = None
        self.reader = None  # chosen by the first byte the client sends
        self.out: list[bytes] = []
        self.parked = None
        self.closing = False
        self.fast_multi: list[list[bytes]] | None = None  # a MULTI the fast path is queueing
        # FastPath.client_ready(sock), kept up to date by the server: recomputed after anything that
        # could change it (a command fakeredis ran for this client, a subscription, a CONFIG)
        self.fast_ready = True
        self.protocol = 2  # RESP version, from the client's HELLO
        self.transport: Any = None
        self.sock: Any = None

    def send(self, data: bytes) -> None:
        """Bytes for the client, sent at the end of the batch (in the order clients got them)."""
        self.out.append(data)
        self.server.dirty[self] = None

    def reply(self, message: Any) -> None:
        if message is OK:
            self.send(b"+OK\r\n")
        elif message is QUEUED:
            self.send(b"+QUEUED\r\n")
        elif message is not NO_REPLY:
            self.send(encode(message, self.protocol))

    def data_received(self, data: bytes) -> None:
        if self.reader is None:
            self.reader = reader_for(data[:1])
        self.reader.feed(data)
        self.process()
        self.server.after_batch()

    def process(self) -> None:
        """Run the complete commands received, until one parks this client.

        The common case, a fast-path command outside a transaction, is handled right here: this
        loop runs for every command Celery sends, and each call and check it saves counts.
        """
        server, sock, out = self.server, self.sock, self.out
        next_command, execute, handlers = self.reader.next_command, server.execute, server.fast_handlers
        blocking_pops = server.blocking_pops
        replied = False
        try:
            while self.parked is None and not self.closing:
                try:
                    command = next_command()
                except PROTOCOL_ERRORS as error:
                    self.reply(SimpleError(f"ERR Protocol error: {error}"))
                    self.closing = True
                    return
                if command is None or command is False:  # the rest has not arrived yet
                    return
                if type(command) is not list or not command or not all(type(part) is bytes for part in command):
                    if command == []:
                        continue  # Redis ignores an empty array
                    self.reply(SimpleError("ERR Protocol error: expected an array of bulk strings"))
                    self.closing = True
                    return
                name = command[0].lower()
                handler = handlers.get(name)
                if handler is None:
                    # MULTI and EXEC of the fast path's transactions (three per Celery task)
                    if name == b"exec" and self.fast_multi is not None and len(command) == 1 \
                            and not server.fast.halted:
                        server.commands_processed += 1
                        try:
                            self.finish_fast_multi(name)
                        except Exception as error:
                            self.failed(command, error)
                        continue
                    if self.fast_multi is None and self.fast_ready and sock._authenticated and not sock._pubsub:
                        if name == b"multi" and len(command) == 1:
                            server.commands_processed += 1
                            self.fast_multi = []
                            out.append(b"+OK\r\n")
                            replied = True
                            continue
                        pop = blocking_pops.get(name)  # the worker's BRPOP: answered, or the client parked
                        if pop is not None:
                            try:
                                result = pop(sock, command)
                            except Defer:
                                pass
                            except Exception as error:
                                self.failed(command, error)
                                continue
                            else:
                                server.commands_processed += 1
                                if result is None:
                                    server.park(self, command)
                                else:
                                    out.append(encode(result, self.protocol))
                                    replied = True
                                continue
                else:
                    if self.fast_multi is not None:  # queued by a MULTI of the fast path
                        self.fast_multi.append(command)
                        server.commands_processed += 1
                        out.append(b"+QUEUED\r\n")
                        replied = True
                        continue
                    if self.fast_ready and sock._authenticated and (not sock._pubsub or name in PUBSUB_ALLOWED):
                        try:
                            result = handler(sock, command)
                        except Defer:
                            pass
                        except Exception as error:
                            self.failed(command, error)
                            continue
                        else:
                            server.commands_processed += 1
                            if result is OK:
                                out.append(b"+OK\r\n")
                            elif result is not NO_REPLY:
                                out.append(encode(result, self.protocol))
                            replied = True
                            continue
                try:
                    execute(self, command)
                except Exception as error:
                    self.failed(command, error)
        finally:
            if replied:
                server.dirty[self] = None

    def finish_fast_multi(self, name: bytes) -> None:
        """EXEC, DISCARD or a nested MULTI inside a MULTI the fast path is queueing."""
        if name == b"multi":
            self.reply(SimpleError("ERR MULTI calls can not be nested"))
            return
        queued, self.fast_multi = self.fast_multi, None
        if name == b"discard":
            self.reply(OK)
            return
        server = self.server
        aof = server.aof
        if aof is not None:
            aof.begin_group()
        try:
            # One after another with nothing in between: the loop is single-threaded.
            sock, handlers, protocol = self.sock, server.fast_handlers, self.protocol
            replies = [b"*%d\r\n" % len(queued)]  # EXEC's array, written as it fills
            for entry in queued:
                try:
                    result = handlers[entry[0].lower()](sock, entry)
                except Defer:
                    result = server.attempt(self, entry)
                replies.append(b"+OK\r\n" if result is OK else encode(result, protocol))
            self.send(b"".join(replies))
        finally:
            if aof is not None:
                aof.end_group()

    def flush(self) -> None:
        out = self.out
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self.closing and self.transport is not None:
            self.transport.close()


def compiled_session() -> tuple[type | None, str]:
    """The compiled session class, or None and why it is not available."""
    try:
        from runner.broker import _session
    except ImportError as error:
        return None, (f"the C extension is not built ({error}); with a C compiler installed (Debian: gcc and "
                      "python3-dev), reinstalling dify-local builds it (pip install -e . in a checkout)")
    if getattr(_session, "API", None) != API:
        return None, (f"the built C extension is for another version (API {getattr(_session, 'API', '?')}, "
                      f"this code {API}): reinstall dify-local to rebuild it")
    return _session.Session, ""


def engine_for(server: Any) -> Any:
    """The compiled sessions' view of `server`: what they read, call and count, handed over once."""
    from fakeredis._core._database import Item
    from fakeredis._helpers import SimpleString
    from fakeredis.model import Hash, ZSet

    from runner.broker import _session
    from runner.broker.fast import NOT_A_FLOAT, PONG, WRONGTYPE, FastPath
    from runner.broker.resp import Push
    from runner.broker.scores import ZADD_OPTIONS, redis_double

    return _session.Engine(
        server=server, core=server.core, aof=server.aof, dirty=server.dirty, parked=server.parked,
        touched=server.touched, waiting=server.waiting, handlers=server.fast_handlers,
        item_type=Item, hash_type=Hash, zset_type=ZSet, push_type=Push, simple_string=SimpleString,
        simple_error=SimpleError, defer=Defer, ok=OK, queued=QUEUED, no_reply=NO_REPLY, pong=PONG,
        wrongtype=WRONGTYPE, not_a_float=NOT_A_FLOAT, encode=encode,
        redis_double=redis_double, zadd_options=ZADD_OPTIONS, watched_changed=FastPath._changed,
        pubsub_allowed=PUBSUB_ALLOWED, multi_nested=SimpleError("ERR MULTI calls can not be nested"),
        weakset_type=weakref.WeakSet, hold=server.fast.hold)
