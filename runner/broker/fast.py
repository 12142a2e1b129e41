"""Celery's hot commands, run directly on fakeredis' data.

Per task, Celery sends about 21 commands to its broker: LPUSH, BRPOP, GET, SETEX, PUBLISH, HSET,
HDEL, ZADD, ZREM, mostly inside MULTI/EXEC. Through fakeredis' generic path (argument signatures,
ACL checks, write-back wrappers, keyspace notifications) each cost about 40 µs here, most of the
broker's time. These run in a few µs on the same data structures, with Redis' replies and errors.

Anything off the common shape (an option, a subscribed client, keyspace notifications switched
on, a WATCH) raises `Defer`, and the caller runs the command through fakeredis as usual.
`tests/test_broker_fast.py` checks these against a real redis-server, reply by reply.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Callable

from fakeredis._core._database import Item
from fakeredis._helpers import SimpleError, SimpleString
from fakeredis.model import Hash, ZSet

from runner.broker.core import deliver
from runner.broker.delivery_hold import hold_commands
from runner.broker.scores import ZADD_OPTIONS, redis_double

WRONGTYPE = SimpleError("WRONGTYPE Operation against a key holding the wrong kind of value")
OK = SimpleString(b"OK")
QUEUED = SimpleString(b"QUEUED")
PONG = SimpleString(b"PONG")
# a score in plain decimal, which Python's float() and Redis' strtod read alike (no exponent, short
# enough that neither overflows nor underflows, where Redis refuses and Python gives inf or 0)
PLAIN_SCORE = re.compile(rb"[-+]?(?:[0-9]{1,300}(?:\.[0-9]{0,300})?|\.[0-9]{1,300})\Z")
NOT_A_FLOAT = SimpleError("ERR value is not a valid float")
NOTHING = object()
NO_REPLY = object()  # the command answered the client itself (pub/sub confirmations)
PUBSUB_ALLOWED = frozenset({b"subscribe", b"unsubscribe", b"ping"})  # what a subscribed RESP2 client may send


class Defer(Exception):
    """Not for the fast path: run it through fakeredis."""


Log = Callable[..., None]  # (db, command[, key]): see EmbeddedBroker.wrote


def _positive_int(raw: bytes) -> int:
    if not raw.isdigit() or raw.startswith(b"0") or len(raw) > 15:
        raise Defer  # zero, negative, malformed, out of range: fakeredis has the exact error
    return int(raw)


class FastPath:
    def __init__(self, core: Any, log: Log):
        self.core = core
        self.log = log  # every write that took effect (the append-only log, parked clients)
        self.halted = False  # writes refused (the log cannot be written): everything goes to the server
        self.commands: dict[bytes, Callable[[Any, list[bytes]], Any]] = {
            b"get": self.get, b"set": self.set, b"setex": self.setex, b"del": self.delete,
            b"lpush": self.lpush, b"rpush": self.rpush, b"llen": self.llen, b"lpop": self.lpop, b"rpop": self.rpop,
            b"brpop": self.brpop, b"blpop": self.blpop,
            b"hset": self.hset, b"hdel": self.hdel, b"hget": self.hget,
            b"zadd": self.zadd, b"zrem": self.zrem, b"publish": self.publish, b"ping": self.ping,
            b"subscribe": self.subscribe, b"unsubscribe": self.unsubscribe,
        }

    def client_ready(self, sock: Any) -> bool:
        """The client's state allows the fast path (cached by the server between changes of it).
        A subscribed client may still use it for PUBSUB_ALLOWED commands."""
        return not (sock._reply_off or sock._reply_skip or sock._watches or sock._transaction is not None
                    or self.halted or self.core.config.get(b"notify-keyspace-events"))

    # -- the data ------------------------------------------------------------------------------------

    @staticmethod
    def _item(sock: Any, key: bytes) -> Item | None:
        db = sock._db
        item = db._dict.get(key)
        if item is not None and item.expireat is not None and item.expireat < time.time():
            del db._dict[key]
            return None
        return item

    @staticmethod
    def _changed(sock: Any, key: bytes) -> None:
        """Tell the clients WATCHing the key that a transaction of theirs must now fail."""
        watchers = sock._db._watches.get(key)
        if watchers:
            for watcher in list(watchers):
                watcher.notify_watch()

    def _wrote(self, sock: Any, command: list[bytes], key: bytes) -> None:
        if sock._db._watches:
            self._changed(sock, key)
        self.log(sock._db_num, command, key)

    # -- strings ----------------------------------------------------------------------------------------

    def get(self, sock: Any, command: list[bytes]) -> Any:
        if len(command) != 2:
            raise Defer
        item = self._item(sock, command[1])
        if item is None:
            return None
        return item.value if type(item.value) is bytes else WRONGTYPE

    def _store(self, sock: Any, command: list[bytes], key: bytes, value: bytes, seconds: float | None) -> Any:
        item = Item(value)
        if seconds is None:
            sock._db[key] = item
            self._wrote(sock, command, key)
            return OK
        item.expireat = expireat = time.time() + seconds
        sock._db[key] = item  # through the Database, which schedules the expiry
        # logged with its absolute expiry, as Redis' AOF writes it: a replay keeps the time it had
        self._wrote(sock, [b"set", key, value, b"pxat", b"%d" % int(expireat * 1000)], key)
        return OK

    def set(self, sock: Any, command: list[bytes]) -> Any:
        if len(command) == 3:
            return self._store(sock, command, command[1], command[2], None)
        if len(command) == 5 and command[3].lower() in (b"ex", b"px"):
            amount = _positive_int(command[4])
            return self._store(sock, command, command[1], command[2],
                               amount if command[3].lower() == b"ex" else amount / 1000)
        raise Defer

    def setex(self, sock: Any, command: list[bytes]) -> Any:
        if len(command) != 4:
            raise Defer
        return self._store(sock, command, command[1], command[3], _positive_int(command[2]))

    def delete(self, sock: Any, command: list[bytes]) -> Any:
        if len(command) < 2:
            raise Defer
        removed = 0
        for key in command[1:]:
            if self._item(sock, key) is not None:
                del sock._db._dict[key]
                self._changed(sock, key)
                removed += 1
        if removed:
            self.log(sock._db_num, command)
        return removed

    # -- lists ------------------------------------------------------------------------------------------

    def _push(self, sock: Any, command: list[bytes], left: bool) -> Any:
        if len(command) < 3:
            raise Defer
        key, values = command[1], command[2:]
        item = self._item(sock, key)
        if item is None:
            item = Item([])
            sock._db._dict[key] = item
        elif type(item.value) is not list:
            return WRONGTYPE
        if left:
            item.value[0:0] = values[::-1]
        else:
            item.value.extend(values)
        self._wrote(sock, command, key)
        return len(item.value)

    def lpush(self, sock: Any, command: list[bytes]) -> Any:
        return self._push(sock, command, left=True)

    def rpush(self, sock: Any, command: list[bytes]) -> Any:
        return self._push(sock, command, left=False)

    def llen(self, sock: Any, command: list[bytes]) -> Any:
        if len(command) != 2:
            raise Defer
        item = self._item(sock, command[1])
        if item is None:
            return 0
        return len(item.value) if type(item.value) is list else WRONGTYPE

    def _pop(self, sock: Any, key: bytes, left: bool) -> Any:
        """The value popped, None if there is no list, WRONGTYPE if the key is not one."""
        item = self._item(sock, key)
        if item is None:
            return None
        if type(item.value) is not list:
            return WRONGTYPE
        value = item.value.pop(0 if left else -1)
        if not item.value:
            del sock._db._dict[key]
        return value

    def lpop(self, sock: Any, command: list[bytes]) -> Any:
        if len(command) != 2:
            raise Defer
        value = self._pop(sock, command[1], left=True)
        if type(value) is bytes:
            self._wrote(sock, command, command[1])
        return value

    def rpop(self, sock: Any, command: list[bytes]) -> Any:
        if len(command) != 2:
            raise Defer
        value = self._pop(sock, command[1], left=False)
        if type(value) is bytes:
            self._wrote(sock, command, command[1])
        return value

    def _blocking_pop(self, sock: Any, command: list[bytes], left: bool) -> Any:
        """One try of BRPOP/BLPOP: [key, value], or None (the server parks the client)."""
        if len(command) < 3:
            raise Defer
        try:
            timeout = float(command[-1])
        except ValueError:
            raise Defer from None
        if not timeout >= 0 or math.isinf(timeout):
            raise Defer
        for key in command[1:-1]:
            value = self._pop(sock, key, left)
            if value is WRONGTYPE:
                return value
            if value is not None:
                # logged as what it did (its timeout does not matter to a replay)
                self._wrote(sock, [b"lpop" if left else b"rpop", key], key)
                self.hold(sock, value)
                return [key, value]
        return None

    def hold(self, sock: Any, message: bytes) -> None:
        """A task message just popped, held in kombu's unacked hash (see delivery_hold). Also
        called by the compiled blocking pop."""
        commands = hold_commands(message)
        if commands is not None:
            hset, zadd = commands
            self.hset(sock, hset)  # (on a key of another type: WRONGTYPE, not held, as kombu's own would fail)
            self.zadd(sock, zadd)

    def brpop(self, sock: Any, command: list[bytes]) -> Any:
        return self._blocking_pop(sock, command, left=False)

    def blpop(self, sock: Any, command: list[bytes]) -> Any:
        return self._blocking_pop(sock, command, left=True)

    # -- hashes -----------------------------------------------------------------------------------------

    def _hash(self, sock: Any, key: bytes, create: bool) -> Any:
        """The hash's Item, with its due field TTLs applied; None if there is none; WRONGTYPE."""
        item = self._item(sock, key)
        if item is None:
            if not create:
                return None
            item = Item(Hash())
            sock._db._dict[key] = item
        elif type(item.value) is not Hash:
            return WRONGTYPE
        elif item.value._expiry_heap:
            item.value._expire_keys()
            if not item.value._values:  # every field expired: Redis has no such key
                del sock._db._dict[key]
                return self._hash(sock, key, create)
        return item

    def hset(self, sock: Any, command: list[bytes]) -> Any:
        if len(command) < 4 or len(command) % 2:
            raise Defer
        item = self._hash(sock, command[1], create=True)
        if item is WRONGTYPE:
            return item
        # Hash's own dicts: its methods convert and check every field again (fields here are bytes)
        fields, expirations = item.value._values, item.value._expirations
        before = len(fields)
        for at in range(2, len(command), 2):
            if expirations:
                expirations.pop(command[at], None)  # HSET clears a field's TTL, as in Redis
            fields[command[at]] = command[at + 1]
        self._wrote(sock, command, command[1])
        return len(fields) - before

    def hdel(self, sock: Any, command: list[bytes]) -> Any:
        if len(command) < 3:
            raise Defer
        item = self._hash(sock, command[1], create=False)
        if item is None or item is WRONGTYPE:
            return 0 if item is None else item
        fields, expirations = item.value._values, item.value._expirations
        removed = 0
        for field in command[2:]:
            if fields.pop(field, NOTHING) is not NOTHING:
                expirations.pop(field, None)
                removed += 1
        if not fields:
            del sock._db._dict[command[1]]
        if removed:
            self._wrote(sock, command, command[1])
        return removed

    def hget(self, sock: Any, command: list[bytes]) -> Any:
        if len(command) != 3:
            raise Defer
        item = self._hash(sock, command[1], create=False)
        if item is None or item is WRONGTYPE:
            return item
        return item.value.get(command[2])

    # -- sorted sets ------------------------------------------------------------------------------------

    def zadd(self, sock: Any, command: list[bytes]) -> Any:
        if len(command) < 4 or len(command) % 2:
            raise Defer
        pairs = []
        for at in range(2, len(command), 2):
            raw = command[at]
            if PLAIN_SCORE.match(raw) is not None:
                pairs.append((float(raw), command[at + 1]))
                continue
            if raw.upper() in ZADD_OPTIONS:
                raise Defer  # fakeredis has the options
            score = redis_double(raw)
            if score is None:  # Redis reads every score before it looks at the key
                return NOT_A_FLOAT
            pairs.append((score, command[at + 1]))
        item = self._item(sock, command[1])
        if item is None:
            item = Item(ZSet())
            sock._db._dict[command[1]] = item
        elif not isinstance(item.value, ZSet):
            return WRONGTYPE
        zset = item.value
        added = 0
        for score, member in pairs:
            added += member not in zset
            zset.add(member, score + 0.0)
        self._wrote(sock, command, command[1])
        return added

    def zrem(self, sock: Any, command: list[bytes]) -> Any:
        if len(command) < 3:
            raise Defer
        item = self._item(sock, command[1])
        if item is None:
            return 0
        if not isinstance(item.value, ZSet):
            return WRONGTYPE
        zset = item.value
        removed = 0
        for member in command[2:]:
            if member in zset:
                zset.discard(member)
                removed += 1
        if not zset:
            del sock._db._dict[command[1]]
        if removed:
            self._wrote(sock, command, command[1])
        return removed

    # -- pub/sub and the rest ---------------------------------------------------------------------------

    def publish(self, sock: Any, command: list[bytes]) -> Any:
        if len(command) != 3:
            raise Defer
        return deliver(self.core, command[1], command[2])

    def subscribe(self, sock: Any, command: list[bytes]) -> Any:
        """SUBSCRIBE: a confirmation pushed per channel (the client's own replies, sent directly)."""
        if len(command) < 2:
            raise Defer
        sock._subscribe(command[1:], self.core.subscribers, b"subscribe")
        return NO_REPLY

    def unsubscribe(self, sock: Any, command: list[bytes]) -> Any:
        if len(command) < 2:
            raise Defer  # from every channel: fakeredis works out which
        sock._unsubscribe(command[1:], self.core.subscribers, b"unsubscribe")
        return NO_REPLY

    def ping(self, sock: Any, command: list[bytes]) -> Any:
        if len(command) == 1:
            return PONG
        raise Defer
