"""The embedded broker: fakeredis' command core behind a server front end of our own.

fakeredis' TCP server runs a thread per connection that polls its socket every 10 ms; profiled
under Celery, three quarters of the broker's time went to that polling, and it ran Celery at
half the speed of redis-server. This front end is one asyncio event loop for every connection:
bytes arrive, each client's read loop (`session.py`, compiled where it is built) runs Celery's hot
commands straight on the core's data (`fast.FastPath`) and hands the rest to `execute`, which runs
them through the core (`core.BrokerSocket`); every write is encoded into the append-only log's
buffer as it takes effect, and after each read the batch's writes go to the log file (one
write(2)), then its buffered replies are sent: what a client is told was done is in the file.

Blocking commands (BRPOP and kin, which Celery's workers wait on) are tried at once through the
core; if there is nothing to pop, the client is parked on its keys and tried again when a write
touches one of them, or answered empty when its timeout passes. A client that hangs up while
parked is simply forgotten, as Redis forgets it: nothing is popped for a dead connection.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import resource
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
from fakeredis import FakeServer
from fakeredis._helpers import SimpleError, SimpleString

from runner.broker.aof import AppendOnlyLog, LoadReport, LogRefused
from runner.broker.core import WRITE_COMMANDS, BrokerSocket
from runner.broker.fast import Defer, FastPath
from runner.broker.resp import NULL_ARRAY
from runner.broker.session import PySession, compiled_session, engine_for
from runner.settings.kinds import host_port, is_loopback

log = logging.getLogger("dify_local.broker")

PUBLISHED_PASSWORD = "difyai123456"  # Dify's .env.example and documentation print it: no secret off loopback
EXPIRE_INTERVAL = 1.0  # seconds between sweeps for expired keys
WRITE_RETRY = 0.1  # seconds between tries of a write to the log that the disk refused
REDIS_VERSION = "7.4.0"  # what the broker tells clients it speaks (fakeredis' 7.4 command set)


def _key_positions() -> dict[bytes, tuple[int, int, int]]:
    """(first, last, step) of each command's keys, from Redis' command table."""
    table = json.loads((Path(fakeredis.__file__).parent / "commands.json").read_text())
    return {name.encode(): (info[3], info[4], info[5]) for name, info in table.items() if " " not in name}


KEYS = _key_positions()
# fakeredis' table gives these one key (last = 1); in Redis they take several, the timeout last.
# A client parked on `BRPOP q1 q2 q3 1` must wake for a push to any of them: Celery waits so on
# every queue and priority list a worker consumes.
KEYS.update({name: (1, -2, 1) for name in (b"brpop", b"blpop", b"bzpopmin", b"bzpopmax")})
# Blocking commands: where their timeout is, and what a timeout answers.
BLOCKING = {b"brpop": -1, b"blpop": -1, b"bzpopmin": -1, b"bzpopmax": -1, b"brpoplpush": -1, b"blmove": -1,
            b"blmpop": 1, b"bzmpop": 1}
NULL_BULK_ON_TIMEOUT = {b"brpoplpush", b"blmove"}
GROUPED = {b"exec", b"eval", b"evalsha", b"eval_ro", b"evalsha_ro", b"fcall", b"fcall_ro"}  # effects written together
# what a client gets when a command fails by a fault of ours: that command fails, nothing else
INTERNAL_ERROR = SimpleError("ERR internal error in the embedded broker (see its log)")
# refused while the log cannot be written, as Redis refuses them (MISCONF): scripts and
# transactions may write too
REFUSED_WHEN_HALTED = frozenset({name.encode() for name in WRITE_COMMANDS if " " not in name}) | GROUPED


def keys_of(command: list[bytes]) -> list[bytes]:
    name = command[0].lower()
    if name in (b"blmpop", b"bzmpop"):  # timeout numkeys key …
        try:
            return command[3 : 3 + int(command[2])]
        except (IndexError, ValueError):
            return []
    first, last, step = KEYS.get(name, (0, 0, 0))
    if first <= 0:
        return []
    end = len(command) + last if last < 0 else last
    return command[first : end + 1 : max(step, 1)]


class BrokerStartError(Exception):
    pass


@dataclass
class Parked:
    connection: "Connection"
    command: list[bytes]
    keys: set[tuple[int, bytes]]
    timer: asyncio.TimerHandle | None = None


class Connection:
    """asyncio's side of one client connection; the read loop itself is the session's (session.py),
    mixed in by the concrete classes below."""

    def __init__(self, server: "EmbeddedBroker"):
        super().__init__()
        self.server = server
        self.engine = server.engine
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        raw = transport.get_extra_info("socket")
        if raw is not None and raw.family in (socket.AF_INET, socket.AF_INET6):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername") or ("?", 0)
        local = transport.get_extra_info("sockname") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        self.sock = BrokerSocket(self.server.core, password=self.server.password, on_reply=self.reply,
                                 on_write=self.server.wrote,
                                 client_info={"addr": host_port(*peer[:2]), "laddr": host_port(*local[:2]),
                                              "fd": raw.fileno() if raw else 0})
        self.server.connections.add(self)
        self.server.connections_received += 1
        log.debug("client %s connected", self.peer)

    def failed(self, command: list[bytes], error: BaseException) -> None:
        """A fault of ours (or a malformed argument) costs this command, not the connection or the
        broker: logged with its traceback, and an error reply."""
        log.error("command %r failed", command[0], exc_info=error)
        self.reply(INTERNAL_ERROR)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.unpark(self)
        self.server.connections.discard(self)
        self.server.dirty.pop(self, None)
        self.server.held.pop(self, None)
        if self.sock is not None:
            self.sock.close()
        log.debug("client %s disconnected", self.peer)


# The session first: asyncio.Protocol's own data_received (a no-op) must not shadow it.
class PyConnection(Connection, PySession, asyncio.Protocol):
    pass


CSession, COMPILED_UNAVAILABLE = compiled_session()
CConnection = type("CConnection", (Connection, CSession, asyncio.Protocol), {}) if CSession else None


class EmbeddedBroker:
    """A Redis-protocol server on one address; `state` (a folder) makes it durable."""

    def __init__(self, host: str, port: int, password: str | None, state: Path | None = None,
                 rewrite_min_bytes: int | None = None, compiled: bool = True):
        if not is_loopback(host) and not password:
            raise BrokerStartError(f"refusing to listen on {host} without a password: anyone who can reach it "
                                   "could read and change every queue; set REDIS_PASSWORD or listen on 127.0.0.1")
        if not is_loopback(host) and password == PUBLISHED_PASSWORD:
            raise BrokerStartError(f"refusing to listen on {host} with Dify's published example password: it is "
                                   "printed in Dify's documentation, so anyone who can reach the port could use the "
                                   "broker; set "
                                   "REDIS_PASSWORD (or --password) to a secret of your own, or listen on 127.0.0.1")
        self.host, self.port = host, port
        self.password = password.encode() if password else None
        self.core = FakeServer(version=(7, 4))
        # the read loop: compiled where it is built (and wanted), else Python's (session.py)
        self.compiled = compiled and CConnection is not None
        self.aof = AppendOnlyLog(state, compiled=self.compiled,
                                 **({"rewrite_min_bytes": rewrite_min_bytes} if rewrite_min_bytes else {})) \
            if state is not None else None
        self.connections: set[Connection] = set()
        # connections with replies to send, in the order they got them (as Redis writes them): a
        # message published inside a transaction goes out before the transaction's own reply
        self.dirty: dict[Connection, None] = {}
        # connections whose replies wait for writes the log file refused (a full disk): sent once written
        self.held: dict[Connection, None] = {}
        self._logged = 0  # the log buffer's written + pending when write_log last ran
        self._retry: asyncio.TimerHandle | None = None
        self.parked: collections.OrderedDict[int, Parked] = collections.OrderedDict()
        self.touched: set[tuple[int, bytes]] = set()  # written keys someone waits on
        self.waiting: dict[tuple[int, bytes], int] = {}  # (db, key): how many parked clients wait on it
        self.loading = False
        self.check_kills = False  # a CLIENT command ran: a CLIENT KILL may have closed someone
        self.started = time.time()
        self.connections_received = 0
        self.commands_processed = 0
        self.load_report = LoadReport()
        self.rewrite_refused = ""  # why the last compaction did not happen
        self._captured: list[Any] = []
        self._internal = BrokerSocket(self.core, password=None, on_reply=self._captured.append, on_write=self.wrote)
        self.core.sockets.remove(self._internal)  # the broker's own: not a client (CLIENT LIST, KILL)
        self.fast = FastPath(self.core, self.wrote)
        # the fast path's commands, but for the blocking pops (tried in _blocking, which can park)
        self.fast_handlers = {name: handler for name, handler in self.fast.commands.items() if name not in BLOCKING}
        self.blocking_pops = {name: handler for name, handler in self.fast.commands.items() if name in BLOCKING}
        self.connection_class = CConnection if self.compiled else PyConnection
        self.engine = engine_for(self) if self.compiled else None
        if self.engine is not None:
            self.after_batch = self.engine.after_batch  # the same steps, in C
        self._server: asyncio.base_events.Server | None = None
        # kept, not asked for: asyncio.get_running_loop() makes a getpid() system call each time
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._expiry: asyncio.TimerHandle | None = None

    # -- writes -----------------------------------------------------------------------------------

    def wrote(self, db: int, command: list[bytes], key: bytes | None = None) -> None:
        """Every write that took effect (on `key`, where the caller knows it): wake clients parked
        on its keys, and log it."""
        waiting = self.waiting
        if waiting:
            if key is not None:
                if (db, key) in waiting:
                    self.touched.add((db, key))
            else:
                for written in keys_of(command):
                    if (db, written) in waiting:
                        self.touched.add((db, written))
        if self.aof is not None and not self.loading:
            self.aof.append(db, command)

    def internal(self, db: int, command: list[bytes]) -> Any:
        """Run a command as the broker itself (replay, snapshot) and return its reply."""
        if self._internal._db_num != db:
            self._internal._process_command([b"select", b"%d" % db])
        self._captured.clear()
        self._internal._process_command(command)
        return self._captured[-1] if self._captured else None

    # -- commands ---------------------------------------------------------------------------------

    def execute(self, connection: Connection, command: list[bytes]) -> None:
        self.commands_processed += 1
        sock = connection.sock
        name = command[0].lower()
        if self.fast.halted and name in REFUSED_WHEN_HALTED and sock._authenticated:
            connection.fast_multi = None  # a transaction ends with the refused EXEC
            if name == b"exec" and sock._transaction is not None:
                sock._transaction = None
                sock._clear_watches()
            connection.reply(self._misconf())
            return
        # The read loop ran whatever the fast path takes (or the fast path deferred it): what comes
        # here goes to fakeredis, ending a MULTI the fast path was queueing if there is one.
        if connection.fast_multi is not None:
            if name in (b"exec", b"discard", b"multi"):
                connection.finish_fast_multi(name)
                return
            self._hand_multi_to_core(connection)  # then this command, through fakeredis
        try:
            self._execute_slowly(connection, sock, command, name)
        finally:
            # fakeredis may have changed what the fast path depends on (WATCH, MULTI, CLIENT REPLY,
            # CONFIG SET for everyone)
            if name == b"config":
                for other in self.connections:
                    other.fast_ready = self.fast.client_ready(other.sock)
            else:
                connection.fast_ready = self.fast.client_ready(sock)

    def _execute_slowly(self, connection: Connection, sock: BrokerSocket, command: list[bytes], name: bytes) -> None:
        if name == b"client":
            self.check_kills = True
            if self.engine is not None:
                self.engine.check_kills = True  # (the compiled after_batch reads its own flag)
            for other in self.connections:  # CLIENT LIST shows each client's database, as Redis does
                if other.sock is not None:
                    other.sock._client_info["db"] = other.sock._db_num
        if name == b"quit":
            connection.reply(SimpleString(b"OK"))
            connection.closing = True
            return
        if name == b"hello":
            # Answered in the protocol it switches to, as Redis does.
            captured: list[Any] = []
            sock._on_reply = captured.append
            try:
                sock._process_command(command)
            finally:
                sock._on_reply = connection.reply
            connection.protocol = sock._client_info.protocol_version
            for message in captured:
                connection.reply(message)
            return
        if not sock._authenticated or sock._transaction is not None:
            sock._process_command(command)  # AUTH/NOAUTH, or queued by fakeredis' MULTI
            return
        if name in BLOCKING:
            self._blocking(connection, command)
        elif name == b"info":
            connection.reply(self.info(command[1:]))
        elif name in (b"bgrewriteaof", b"save", b"bgsave"):
            connection.reply(self._save_command(name))
        elif name == b"lastsave":
            connection.reply(int(self.aof.last_rewrite or self.started) if self.aof else int(self.started))
        elif name == b"shutdown":
            connection.reply(SimpleString(b"OK"))
            self.event_loop().call_soon(self.stop)
        elif name in GROUPED and self.aof is not None:
            self.aof.begin_group()
            try:
                sock._process_command(command)
            finally:
                self.aof.end_group()
        else:
            sock._process_command(command)

    def _hand_multi_to_core(self, connection: Connection) -> None:
        """A command fakeredis must queue: give it the transaction so far (the client had its OK
        and QUEUED replies already)."""
        queued, connection.fast_multi = connection.fast_multi, None
        sock = connection.sock
        sock._on_reply = lambda message: None
        try:
            for entry in [[b"multi"], *queued]:
                sock._process_command(entry)
        finally:
            sock._on_reply = connection.reply

    def attempt(self, connection: Connection, command: list[bytes]) -> Any:
        """Run a command through the core, capturing its reply (blocking ones never block there);
        blocking pops try the fast path first. None: nothing to pop yet."""
        sock = connection.sock
        pop = self.blocking_pops.get(command[0].lower())
        if pop is not None and connection.fast_ready and sock._authenticated and not sock._pubsub:
            try:
                return pop(sock, command)
            except Defer:
                pass
        captured: list[Any] = []
        sock._on_reply = captured.append
        try:
            sock._process_command(command)
        finally:
            sock._on_reply = connection.reply
        return captured[-1] if captured else None

    def _blocking(self, connection: Connection, command: list[bytes]) -> None:
        result = self.attempt(connection, command)
        if result is not None:
            connection.reply(result)
            return
        self.park(connection, command)

    def park(self, connection: Connection, command: list[bytes]) -> None:
        """The client waits until a write to one of the command's keys, or its timeout."""
        name = command[0].lower()
        try:
            timeout = float(command[BLOCKING[name]])
        except (ValueError, IndexError):
            timeout = 0.0
        db = connection.sock._db_num
        parked = Parked(connection, command, {(db, key) for key in keys_of(command)})
        if timeout > 0:
            parked.timer = self.event_loop().call_later(timeout, self._time_out, parked)
        connection.parked = parked
        self.parked[id(connection)] = parked
        waiting = self.waiting
        for key in parked.keys:
            waiting[key] = waiting.get(key, 0) + 1

    def _forget(self, parked: Parked) -> None:
        waiting = self.waiting
        for key in parked.keys:
            left = waiting.pop(key, 1) - 1
            if left:
                waiting[key] = left

    def _time_out(self, parked: Parked) -> None:
        connection = parked.connection
        if self.parked.pop(id(connection), None) is None:
            return
        self._forget(parked)
        connection.parked = None
        name = parked.command[0].lower()
        protocol = connection.protocol
        connection.send(b"$-1\r\n" if name in NULL_BULK_ON_TIMEOUT and protocol == 2 else NULL_ARRAY[protocol])
        connection.process()  # what it sent meanwhile
        self.after_batch()

    def unpark(self, connection: Connection) -> None:
        parked = self.parked.pop(id(connection), None)
        if parked is not None:
            self._forget(parked)
            if parked.timer is not None:
                parked.timer.cancel()
        connection.parked = None

    def _serve_parked(self) -> None:
        """Clients waiting on keys that were just written, in the order they began to wait."""
        while self.touched:
            touched = set(self.touched)  # (the set itself stays: the compiled sessions hold it)
            self.touched.clear()
            for parked in list(self.parked.values()):
                if parked.keys.isdisjoint(touched) or id(parked.connection) not in self.parked:
                    continue
                result = self.attempt(parked.connection, parked.command)
                if result is None:
                    continue
                self.unpark(parked.connection)
                parked.connection.reply(result)
                parked.connection.process()

    def after_batch(self) -> None:
        """After each read: serve the clients parked on keys it wrote, write the batch's writes
        (theirs included) to the log file, send the replies (also to other clients: pushed
        messages, unparked pops).

        Right away rather than once per turn of the event loop: scheduling that cost a tenth of
        the broker's time. (The compiled engine has its own copy of this, taking the same steps:
        see __init__.)"""
        if self.touched:
            if self.parked:
                self._serve_parked()
            self.touched.clear()
        if self.aof is not None:
            self.write_log()
        for connection in self.dirty:
            connection.flush()
        self.dirty.clear()
        if self.check_kills:
            self.close_killed()

    def write_log(self) -> None:
        """The writes made so far into the log file, before any reply goes out, as Redis does
        before it writes to clients: kill -9 then loses nothing acknowledged, and the fsync
        each second bounds a power loss to about a second.

        If the file refuses them (a full disk), the replies that may tell of them are held back
        (every client's with replies in the batch that made them; nothing can claim a write that
        is not in the file), writes are refused (MISCONF), and the write is tried again every
        WRITE_RETRY s; once it goes through, the held replies are sent."""
        aof = self.aof
        buffer = aof.buffer
        fresh = buffer.written + buffer.pending != self._logged  # this batch made writes
        written = aof.write()
        self._logged = buffer.written + buffer.pending
        if written:
            if self.held:
                held, self.held = self.held, {}
                for connection in held:
                    connection.flush()
        else:
            for connection in list(self.dirty) if fresh else [c for c in self.dirty if c in self.held]:
                self.held[connection] = None
                del self.dirty[connection]
            if self._retry is None and self.loop is not None:
                self._retry = self.loop.call_later(WRITE_RETRY, self._retry_log)
        if bool(aof.error) is not self.fast.halted:
            self._follow_log_health()

    def _retry_log(self) -> None:
        self._retry = None
        self.after_batch()

    def check_log(self) -> None:
        """Compaction once the log has grown enough, and the log's health (each second)."""
        if self.aof.needs_rewrite():
            self.rewrite()
        self.write_log()

    def close_killed(self) -> None:
        self.check_kills = False
        for connection in list(self.connections):
            if connection.sock is not None and connection.sock._killed and connection.transport is not None:
                connection.transport.close()  # CLIENT KILL

    # -- persistence ------------------------------------------------------------------------------

    def load(self) -> LoadReport:
        if self.aof is None:
            return self.load_report
        self.loading = True
        try:
            def execute(db: int, command: list[bytes]) -> bool:
                result = self.internal(db, command)
                if isinstance(result, SimpleError):
                    log.warning("replaying %s on db %d failed: %s", command[0].decode(errors="replace"), db,
                                result.value)
                    return False
                return True

            self.load_report = self.aof.load(execute)
        except LogRefused as error:
            raise BrokerStartError(str(error)) from None
        finally:
            self.loading = False
            self.touched.clear()
        return self.load_report

    def snapshot(self) -> list[tuple[int, list[bytes]]] | None:
        """Commands that rebuild the data (None if a key's type cannot be rebuilt: keep the log)."""
        commands: list[tuple[int, list[bytes]]] = []
        for db in sorted(self.core.dbs):
            if not self.core.dbs[db]:
                continue
            for key in self.internal(db, [b"keys", b"*"]) or []:
                kind = self.internal(db, [b"type", key])
                kind = kind.value if isinstance(kind, SimpleString) else kind
                if kind == b"string":
                    commands.append((db, [b"set", key, self.internal(db, [b"get", key])]))
                elif kind == b"list":
                    values = self.internal(db, [b"lrange", key, b"0", b"-1"])
                    commands.extend((db, [b"rpush", key, *values[i:i + 1000]]) for i in range(0, len(values), 1000))
                elif kind == b"hash":
                    flat = self.internal(db, [b"hgetall", key])
                    flat = [part for pair in flat.items() for part in pair] if isinstance(flat, dict) else flat
                    commands.extend((db, [b"hset", key, *flat[i:i + 2000]]) for i in range(0, len(flat), 2000))
                    fields_expiring = getattr(self.core.dbs[db]._dict[key].value, "_expirations", None) or {}
                    commands.extend((db, [b"hpexpireat", key, b"%d" % when, b"FIELDS", b"1", field])
                                    for field, when in fields_expiring.items())
                elif kind == b"set":
                    members = sorted(self.internal(db, [b"smembers", key]))
                    commands.extend((db, [b"sadd", key, *members[i:i + 1000]]) for i in range(0, len(members), 1000))
                elif kind == b"zset":
                    flat = self.internal(db, [b"zrange", key, b"0", b"-1", b"withscores"])
                    pairs = [part for member, score in zip(flat[::2], flat[1::2], strict=True)
                             for part in (score if isinstance(score, bytes) else repr(score).encode(), member)]
                    commands.extend((db, [b"zadd", key, *pairs[i:i + 2000]]) for i in range(0, len(pairs), 2000))
                elif kind == b"none":
                    continue
                else:
                    log.warning("cannot compact the append-only log: key %r in db %d is a %s", key, db,
                                kind.decode(errors="replace"))
                    return None
                # the expiry as it is kept (absolute), not now + the time left: a snapshot of many
                # keys takes milliseconds, which would each come off the keys' lives
                item = self.core.dbs[db]._dict.get(key)
                if item is not None and item.expireat is not None:
                    commands.append((db, [b"pexpireat", key, b"%d" % round(item.expireat * 1000)]))
        return commands

    def rewrite(self) -> bool:
        if self.aof is None:
            return False
        snapshot = self.snapshot()
        if snapshot is None:
            self.rewrite_refused = "the data holds a type the log cannot compact; the full log is kept"
            return False
        if not self.aof.rewrite(snapshot):
            self.rewrite_refused = "the compacted log could not be written (see the broker's log); the full log is kept"
            return False
        self.rewrite_refused = ""
        return True

    def _save_command(self, name: bytes) -> Any:
        if self.aof is None:
            return SimpleError("ERR persistence is off (the broker runs with --no-persist)")
        if not self.rewrite():
            return SimpleError(f"ERR {self.rewrite_refused}")
        return SimpleString(b"OK" if name == b"save" else b"Background append only file rewriting started")

    # -- INFO ---------------------------------------------------------------------------------------

    def key_count(self) -> int:
        """Keys in every database (some may have expired unseen: fakeredis expires them when read)."""
        return sum(len(db._dict) for db in self.core.dbs.values())

    def info(self, sections: list[bytes]) -> bytes:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") \
            if os.path.exists("/proc/self/statm") else usage.ru_maxrss * 1024
        aof = self.aof
        values = {
            "Server": {"redis_version": REDIS_VERSION, "redis_mode": "standalone", "server_name": "dify-local",
                       "fakeredis_version": fakeredis.__version__,
                       "read_loop": "compiled" if self.compiled else "python", "process_id": os.getpid(),
                       "tcp_port": self.port,
                       "uptime_in_seconds": int(time.time() - self.started)},
            "Clients": {"connected_clients": len(self.connections), "blocked_clients": len(self.parked)},
            "Replication": {"role": "master", "connected_slaves": 0},
            "Memory": {"used_memory": rss, "used_memory_human": f"{rss / 2**20:.1f}M",
                       "keys_in_memory": self.key_count()},  # expired ones not yet dropped included
            "Persistence": {
                "loading": 0, "aof_enabled": int(aof is not None),
                "aof_current_size": aof.size if aof else 0, "aof_base_size": aof.base_size if aof else 0,
                "aof_rewrites": aof.rewrites if aof else 0,
                "aof_last_fsync": int(aof.last_fsync) if aof else 0,
                "aof_last_write_status": "err" if aof and getattr(aof, "error", "") else "ok",
                "aof_last_error": getattr(aof, "error", "") if aof else "",
                "aof_last_rewrite_time": int(aof.last_rewrite or 0) if aof else 0,
                "aof_path": str(aof.path) if aof else "",
                "rdb_last_save_time": int(aof.last_rewrite or self.started) if aof else int(self.started),
                "aof_loaded_commands": self.load_report.commands,
                "aof_set_aside": str(self.load_report.set_aside or ""),
            },
            "Stats": {"total_connections_received": self.connections_received,
                      "total_commands_processed": self.commands_processed + (
                          self.engine.commands_processed if self.engine is not None else 0),
                      "used_cpu_user": round(usage.ru_utime, 3), "used_cpu_sys": round(usage.ru_stime, 3)},
            "Keyspace": {},
        }
        wanted = {section.decode().lower() for section in sections} - {"all", "everything", "default"}
        for db in sorted(self.core.dbs) if not wanted or "keyspace" in wanted else ():
            count = self.internal(db, [b"dbsize"])  # (drops the database's expired keys)
            if count:
                ttls = [item.expireat for item in self.core.dbs[db]._dict.values() if item.expireat is not None]
                now = time.time()
                average = int(sum(max(0.0, at - now) for at in ttls) * 1000 / len(ttls)) if ttls else 0  # ms
                values["Keyspace"][f"db{db}"] = f"keys={count},expires={len(ttls)},avg_ttl={average}"
        lines = []
        for title, fields in values.items():
            if wanted and title.lower() not in wanted:
                continue
            lines.append(f"# {title}")
            lines.extend(f"{name}:{value}" for name, value in fields.items())
            lines.append("")
        return "\r\n".join(lines).encode()

    # -- running --------------------------------------------------------------------------------------

    def event_loop(self) -> asyncio.AbstractEventLoop:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        return self.loop

    async def serve(self) -> None:
        loop = self.event_loop()
        self._stopped = asyncio.Event()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        if self.aof is not None:  # before the first client can connect: its writes go to the file
            try:
                self.aof.open()
            except LogRefused as error:
                raise BrokerStartError(str(error)) from None
        try:
            self._server = await loop.create_server(lambda: self.connection_class(self), self.host, self.port,
                                                    family=family, reuse_address=True)
        except OSError as error:
            if self.aof is not None:
                self.aof.close()
            raise BrokerStartError(self._bind_error(error)) from None
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        self._expiry = loop.call_later(EXPIRE_INTERVAL, self._expire)
        await self._stopped.wait()
        self._expiry.cancel()
        self._server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        await self._server.wait_closed()
        if self._retry is not None:
            self._retry.cancel()
        if self.aof is not None:
            self.aof.write()  # (a write the disk still refuses: close says what is lost)
            if self.aof.size > self.aof.base_size:
                self.rewrite()  # a compact log makes the next start quick
            self.aof.close()

    def _misconf(self) -> SimpleError:
        return SimpleError(f"MISCONF Errors writing to the AOF file: {self.aof.error if self.aof else ''}; "
                           "writes are refused until the append-only log can be written again")

    def _follow_log_health(self) -> None:
        """Refuse writes while the log cannot be written (a full disk), as Redis does: what was
        acknowledged is kept in memory and retried; nothing more is acknowledged meanwhile."""
        halted = bool(self.aof.error) if self.aof is not None else False
        if halted is self.fast.halted:
            return
        self.fast.halted = halted
        if self.engine is not None:
            self.engine.halted = halted
        for connection in self.connections:
            if connection.sock is not None:
                connection.fast_ready = self.fast.client_ready(connection.sock)
        if halted:
            log.error("writes refused (MISCONF) until the append-only log can be written again: %s", self.aof.error)
        else:
            log.warning("the append-only log is written again: writes accepted")

    def _expire(self) -> None:
        """Drop keys whose time is up, as Redis' active expiry does: fakeredis only drops them when
        a command lists or counts keys, so result keys and locks nobody reads again would stay."""
        if self.aof is not None:
            self.check_log()
        now = time.time()
        for db in self.core.dbs.values():
            if db._expiry_heap and db._expiry_heap[0][0] < now:
                db.time = now
                db._remove_expired()
        self._expiry = self.event_loop().call_later(EXPIRE_INTERVAL, self._expire)

    def _bind_error(self, error: OSError) -> str:
        if error.errno == 98:  # EADDRINUSE
            return (f"port {self.port} on {self.host} is in use (another Redis or dify-local?): set REDIS_PORT or "
                    f"use --broker-port, or point CELERY_BROKER_URL at that Redis")
        return f"cannot listen on {self.host}:{self.port}: {error.strerror}"

    def stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()
