"""fakeredis' command core, adapted to an event loop.

`BrokerSocket` is fakeredis' socket for one client with four changes: replies (and pub/sub
messages other clients publish to it) go to a callback instead of a thread-safe queue; errors
keep Redis' exact text; a blocking command never waits inside the core (the server parks the
client instead, see `server.py`); and every write that takes effect is reported, with the database
it ran on, for the append-only log. Commands inside MULTI/EXEC and inside Lua scripts pass
through the same place, so the log holds what they did, not the scripts that did it. And scripts
run in Redis' Lua sandbox, not in fakeredis' open interpreter (`lua_sandbox.SandboxedScripting`).
"""

from __future__ import annotations

import hmac
import json
import weakref
from pathlib import Path
from typing import Any, Callable

import fakeredis
from fakeredis._helpers import NoResponse, SimpleError, SimpleString, compile_pattern
from fakeredis._socket import FakeSocket

from runner.broker.lua_sandbox import SandboxedScripting
from runner.broker.resp import Push
from runner.broker.scores import zadd_scores

NOAUTH = "NOAUTH Authentication required."
NOAUTH_HELLO = ("NOAUTH HELLO must be called with the client already authenticated, otherwise the "
                "HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and "
                "select the RESP protocol version at the same time")
WRONGPASS = "WRONGPASS invalid username-password pair or user is disabled."
SYNTAX = "ERR syntax error"


def _write_commands() -> frozenset[str]:
    """Commands Redis flags as writes (fakeredis ships Redis' command table)."""
    table = json.loads((Path(fakeredis.__file__).parent / "commands.json").read_text())
    return frozenset(name for name, info in table.items() if "write" in info[2])


WRITE_COMMANDS = _write_commands()
# Writes whose expiry is relative to now: the log adds the absolute time (PEXPIREAT), as Redis'
# AOF does, so a replay does not give the key a fresh lifetime.
RELATIVE_EXPIRY = frozenset({"set", "setex", "psetex", "expire", "pexpire", "expireat", "getex", "restore"})
# Writes whose effect the broker chose (at random, or from the clock): logged as what they did, as
# Redis' AOF does, so a replay does not choose anew.
CHOSEN = frozenset({"spop", "xadd"})
HASH_FIELD_EXPIRY = frozenset({"hexpire", "hpexpire", "hexpireat", "hsetex", "hgetex"})


def as_chosen(name: str, command: list[bytes], result: Any) -> list[bytes] | None:
    if name == "spop":  # SREM of the members it popped (None: it popped nothing)
        popped = result if isinstance(result, list) else [] if result is None else [result]
        return [b"srem", command[1], *popped] if popped else None
    if name == "xadd" and isinstance(result, bytes):  # the ID it gave the entry, for "*" or "ms-*"
        at = 2
        while at < len(command):
            word = command[at].upper()
            if word == b"NOMKSTREAM":
                at += 1
            elif word in (b"MAXLEN", b"MINID"):
                at += 2 if command[at + 1] in (b"=", b"~") else 1
                at += 1
                if at < len(command) and command[at].upper() == b"LIMIT":
                    at += 2
            else:
                break
        return [*command[:at], result, *command[at + 1:]]
    return command


# Blocking pops are written only when they popped: a parked client is tried after many writes.
BLOCKING_COMMANDS = frozenset({"brpop", "blpop", "bzpopmin", "bzpopmax", "brpoplpush", "blmove", "blmpop", "bzmpop"})

WriteListener = Callable[[int, list[bytes]], None]


class BrokerSocket(SandboxedScripting, FakeSocket):  # scripts run in Redis' sandbox (lua_sandbox.py)
    def __init__(self, server: Any, *, password: bytes | None, on_reply: Callable[[Any], None],
                 on_write: WriteListener, client_info: dict | None = None):
        super().__init__(server, 0, client_class=object, client_info=client_info or {})
        self._password = password
        self._authenticated = password is None
        self._on_reply = on_reply
        self._on_write = on_write

    # -- replies ------------------------------------------------------------------------------------

    def put_response(self, msg: Any) -> None:
        self._on_reply(msg)

    def _decode_error(self, error: SimpleError) -> Any:
        return error  # written as Redis writes it: "-WRONGTYPE Operation …"

    def _decode_result(self, result: Any) -> Any:
        if isinstance(result, list):
            return [self._decode_result(item) for item in result]
        return result  # SimpleString and SimpleError stay typed: the encoder writes them as Redis does

    # -- what the core must not do here -----------------------------------------------------------

    def _blocking(self, timeout: Any, func: Any, shape: Any = None) -> Any:
        """Never wait: inside MULTI/EXEC, a script or a replay Redis does not block either, and
        a client's own blocking command is parked by the server before it reaches the core."""
        result = func(True)
        return result if shape is None else shape(result)

    # -- pub/sub: fakeredis' own, but sending its messages as pushes (RESP3's ">") ------------------

    def _subscribe(self, channels: Any, subscribers: dict, mtype: bytes) -> Any:
        # fakeredis' WeakSets, through the set of references underneath (as WeakSet.add does, minus
        # three Python calls): Celery's result consumer subscribes and unsubscribes once per task
        me = weakref.ref(self)
        for channel in channels:
            subs = subscribers[channel]
            if me not in subs.data:
                subs.add(self)
                self._pubsub += 1
            self.put_response(Push([mtype, channel, self._pubsub]))
        return NoResponse()

    def _unsubscribe(self, channels: Any, subscribers: dict, mtype: bytes) -> Any:
        if not channels:
            channels = [channel for channel, subs in subscribers.items() if self in subs]
            if not channels:
                self.put_response(Push([mtype, None, 0]))  # as Redis answers a client subscribed to nothing
        me = weakref.ref(self)
        for channel in channels:
            subs = subscribers.get(channel)
            if subs is not None and me in subs.data:
                subs.data.discard(me)
                if not subs.data:
                    del subscribers[channel]
                self._pubsub -= 1
            self.put_response(Push([mtype, channel, self._pubsub]))
        return NoResponse()

    def publish(self, channel: bytes, message: bytes) -> int:
        return deliver(self._server, channel, message)

    def _publish_to_channel(self, channel: bytes, message: bytes, pattern_regex: dict) -> None:
        deliver(self._server, channel, message)

    # -- the append-only log ----------------------------------------------------------------------

    def _run_command(self, func: Any, sig: Any, args: list[Any], from_script: bool) -> Any:
        if sig.name == "zadd":
            scores = zadd_scores(args)
            if scores is None:
                return SimpleError("ERR value is not a valid float")
            args = scores
        result = super()._run_command(func, sig, args, from_script)
        if sig.name in BLOCKING_COMMANDS and result is None:
            return result
        if sig.name in WRITE_COMMANDS and not isinstance(result, SimpleError):
            command = [part.encode() for part in sig.name.split(" ")] + [
                arg if isinstance(arg, bytes) else str(arg).encode() for arg in args]
            if sig.name in CHOSEN:
                command = as_chosen(sig.name, command, result)
                if command is None:
                    return result
            self._on_write(self._db_num, command)
            if sig.name in HASH_FIELD_EXPIRY and args:
                self._log_field_expiry(args)
            if sig.name in RELATIVE_EXPIRY and args:
                item = self._db._dict.get(args[0]) if self._db is not None else None
                if item is not None and item.expireat is not None:
                    self._on_write(self._db_num, [b"pexpireat", args[0], b"%d" % int(item.expireat * 1000)])
        return result

    def _log_field_expiry(self, args: list[Any]) -> None:
        """The absolute expiry of the hash fields the command named (HPEXPIREAT), as for keys."""
        item = self._db._dict.get(args[0]) if self._db is not None else None
        expirations = getattr(getattr(item, "value", None), "_expirations", None)
        if not expirations:
            return
        upper = [arg.upper() if isinstance(arg, bytes) else arg for arg in args]
        if b"FIELDS" not in upper:
            return
        for field in args[upper.index(b"FIELDS") + 2:]:
            when = expirations.get(field)
            if when is not None:
                self._on_write(self._db_num, [b"hpexpireat", args[0], b"%d" % when, b"FIELDS", b"1", field])

    # -- authentication ---------------------------------------------------------------------------

    def _check(self, username: bytes | None, password: bytes) -> bool:
        ok = (username in (None, b"default")) and self._password is not None and hmac.compare_digest(
            password, self._password)
        if ok:
            self._authenticated = True
        return ok

    def _process_command(self, fields: list[bytes]) -> None:
        if not fields:
            return
        name = fields[0].lower()
        if self._password is not None:
            if name == b"auth":
                self._auth_command(fields[1:])
                return
            if name == b"hello":
                fields = self._hello_auth(fields)
                if fields is None:
                    return
            elif not self._authenticated and name != b"quit":
                self.put_response(SimpleError(NOAUTH))
                return
        super()._process_command(fields)

    def _auth_command(self, arguments: list[bytes]) -> None:
        if len(arguments) not in (1, 2):
            self.put_response(SimpleError("ERR wrong number of arguments for 'auth' command"))
        elif self._check(arguments[0] if len(arguments) == 2 else None, arguments[-1]):
            self.put_response(SimpleString(b"OK"))
        else:
            self.put_response(SimpleError(WRONGPASS))

    def _hello_auth(self, fields: list[bytes]) -> list[bytes] | None:
        """HELLO … AUTH user pass: check and strip the credentials; None when refused."""
        arguments = list(fields[1:])
        upper = [argument.upper() for argument in arguments]
        if b"AUTH" in upper:
            at = upper.index(b"AUTH")
            if at + 2 >= len(arguments):
                self.put_response(SimpleError(SYNTAX))
                return None
            if not self._check(arguments[at + 1], arguments[at + 2]):
                self.put_response(SimpleError(WRONGPASS))
                return None
            del arguments[at:at + 3]
        elif not self._authenticated:
            self.put_response(SimpleError(NOAUTH_HELLO))
            return None
        return [fields[0], *arguments]


def deliver(server: Any, channel: bytes, message: bytes) -> int:
    """Push a message to the channel's subscribers and to every matching pattern's; how many got it."""
    receivers = 0
    subscribers = server.subscribers.get(channel)
    if subscribers is not None and subscribers.data:
        push = Push([b"message", channel, message])
        # fakeredis keeps subscribers in WeakSets, whose Python-level iteration cost more than the
        # rest of PUBLISH: read the references underneath (a snapshot, as a reply may unsubscribe)
        for reference in list(subscribers.data):
            subscriber = reference()
            if subscriber is not None:
                subscriber.put_response(push)
                receivers += 1
    if server.psubscribers:
        for pattern, subscribers in list(server.psubscribers.items()):
            # (Redis' glob never matches an empty channel but with an empty pattern; fakeredis' regex would)
            if subscribers and (compile_pattern(pattern).match(channel) if channel else not pattern):
                push = Push([b"pmessage", pattern, channel, message])
                for subscriber in list(subscribers):
                    subscriber.put_response(push)
                    receivers += 1
    return receivers
