"""The embedded broker as Celery needs it: password enforced, errors keep the connection, Lua."""

from __future__ import annotations

import re
import socket
import sys
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.helpers import port_open, wait_until


def read_until(raw: socket.socket, expected: bytes, timeout: float = 5) -> bytes:
    """Replies may come in several segments: read until `expected` is whole (or time runs out)."""
    raw.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < len(expected) and time.monotonic() < deadline:
        data += raw.recv(1024)
    return data


@pytest.fixture
def broker(project, read_loop):
    project.serve_broker(env=read_loop)
    return project.broker_port


def resp_auth(project) -> bytes:
    """AUTH with the project's broker password, as a client sends it."""
    password = project.broker_password.encode()
    return b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(password), password)


NO_RETRY = Retry(NoBackoff(), 0)  # redis-py retries an AuthenticationError (a ConnectionError) by default


def test_password_is_required(project, broker):
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=broker, protocol=2, retry=NO_RETRY).set("key", "value")  # no AUTH: NOAUTH
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=broker, password="wrong", retry=NO_RETRY).ping()
    raw = socket.create_connection(("127.0.0.1", broker))
    raw.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
    assert read_until(raw, b"-NOAUTH Authentication required.\r\n") == b"-NOAUTH Authentication required.\r\n"
    raw.sendall(resp_auth(project) + b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
    assert read_until(raw, b"+OK\r\n$-1\r\n") == b"+OK\r\n$-1\r\n"  # the refused SET wrote nothing
    raw.close()


UNAUTHENTICATED = [b"PING", b"INFO", b"SELECT 1", b"GET k", b'EVAL "return 1" 0', b"SUBSCRIBE ch", b"PSUBSCRIBE *",
                   b"CLIENT LIST", b"MULTI", b"COMMAND COUNT", b"FLUSHALL", b"HELLO 3", b"HELLO 2 AUTH default wrong",
                   b"AUTH wrong", b"QUIT"]


def first_reply(port: int, line: bytes) -> bytes:
    """What a new, unauthenticated connection is answered to one inline command."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(line + b"\r\n")
        data = b""
        while not data.endswith(b"\r\n"):
            data += raw.recv(1024)
        return data


def test_unauthenticated_clients_get_what_redis_answers(broker, redis_server):
    """NOAUTH for every command but AUTH, HELLO … AUTH and QUIT, word for word as redis-server
    (with requirepass) answers a client that has not authenticated."""
    real = int(redis_server.rsplit(":", 1)[1])
    for line in UNAUTHENTICATED:
        ours, theirs = first_reply(broker, line), first_reply(real, line)
        if line == b"HELLO 3":  # Redis 7.2 added "<proto>" to this text; we answer as the 7.4 we report
            ours, theirs = ours.split(b" ")[0], theirs.split(b" ")[0]
        assert ours == theirs, line


def test_error_replies_keep_the_connection(project, broker):
    client = redis.Redis(port=broker, password=project.broker_password, single_connection_client=True)
    client.set("text", "x")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        client.lpush("text", "y")
    with pytest.raises(redis.exceptions.NoScriptError):
        client.evalsha("0" * 40, 0)
    assert client.get("text") == b"x"  # same connection, still served
    assert client.client_id() == client.client_id()


def test_lua_scripts_as_kombu_uses_them(project, broker):
    client = redis.Redis(port=broker, password=project.broker_password)
    script = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert script(keys=["n"], args=[2]) == 2 and script(keys=["n"], args=[3]) == 5  # EVALSHA after NOSCRIPT
    lock = client.lock("unacked_mutex", timeout=5)
    assert lock.acquire(blocking=False) and lock.release() is None


def test_a_dead_clients_blocking_pop_does_not_swallow_a_message(project, broker):
    """A worker killed while its BRPOP waits must not take the next message with it: Redis drops a
    disconnected client's blocking state, and so must the embedded broker."""
    raw = socket.create_connection(("127.0.0.1", broker))
    raw.sendall(resp_auth(project) + b"*3\r\n$5\r\nBRPOP\r\n$5\r\njobs1\r\n$1\r\n5\r\n")
    assert read_until(raw, b"+OK\r\n") == b"+OK\r\n"
    time.sleep(0.2)  # the BRPOP is now blocked in the broker
    raw.close()  # the client dies (as with kill -9)
    time.sleep(0.2)
    client = redis.Redis(port=broker, password=project.broker_password)
    client.lpush("jobs1", "the message")
    assert client.brpop(["jobs1"], timeout=5) == (b"jobs1", b"the message")


def test_expired_keys_leave_memory_without_being_read(project, broker):
    """Redis drops keys whose time is up on its own (active expiry); fakeredis only when keys are
    listed or counted. Nothing here lists them (INFO memory's count does not): the broker's sweep must."""
    client = redis.Redis(port=broker, password=project.broker_password)
    client.set("short-lived", "x", px=200)
    client.set("kept", "y")

    def keys_in_memory() -> int:
        return int(client.info("memory")["keys_in_memory"])
    assert keys_in_memory() == 2
    wait_until(lambda: keys_in_memory() == 1, 10, "the expired key to be dropped")
    assert client.get("kept") == b"y"


def test_client_list_and_kill_as_redis_shows_them(project, broker):
    """Each client with its address as host:port and its database; the broker's own internal
    client not among them; CLIENT KILL ADDR finds a client by that address."""
    watcher = redis.Redis(port=broker, password=project.broker_password, db=1, single_connection_client=True)
    other = redis.Redis(port=broker, password=project.broker_password, db=3, single_connection_client=True,
                        retry=NO_RETRY)
    other.ping()
    clients = watcher.client_list()
    assert len(clients) == 2, clients
    me = watcher.client_id()
    mine = next(entry for entry in clients if int(entry["id"]) == me)
    theirs = next(entry for entry in clients if int(entry["id"]) != me)
    assert mine["db"] == "1" and theirs["db"] == "3"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", theirs["addr"]), theirs
    assert watcher.client_kill(theirs["addr"]) is True
    with pytest.raises(redis.ConnectionError):
        other.ping()
    other.close()


def test_info_keyspace_counts_keys_expiring_and_their_average_ttl(project, broker):
    client = redis.Redis(port=broker, password=project.broker_password, db=2)
    client.set("forever", "x")
    client.set("a", "x", ex=100)
    client.set("b", "x", ex=300)
    db2 = client.info("keyspace")["db2"]
    assert db2["keys"] == 3 and db2["expires"] == 2
    assert 150_000 <= db2["avg_ttl"] <= 200_000  # ms, as Redis reports it (counting down meanwhile)


def test_the_start_line_names_the_read_loop(project, read_loop):
    proc = project.serve_broker(env=read_loop)
    loop = "compiled" if read_loop["DIFY_LOCAL_BROKER_COMPILED"] == "true" else "Python"
    proc.wait_for_line(rf"embedded broker \(fakeredis [\d.]+, {loop} read loop\) listening on", timeout=20)


def test_commands_split_anywhere_inline_or_pipelined_are_read_as_redis_reads_them(project, broker):
    raw = socket.create_connection(("127.0.0.1", broker))
    raw.sendall(b"AUTH %s\r\n" % project.broker_password.encode())  # inline, as typed into telnet
    assert read_until(raw, b"+OK\r\n") == b"+OK\r\n"
    big = b"x" * 300_000  # bigger than one read
    pipelined = (b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n%s\r\n" % (len(big), big)
                 + b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n" + b"*0\r\n" + b"*1\r\n$4\r\nPING\r\n")
    for at in range(0, len(pipelined), 7919):  # in pieces cut mid-number, mid-string, mid-CRLF
        raw.sendall(pipelined[at:at + 7919])
    expected = b"+OK\r\n$%d\r\n%s\r\n+PONG\r\n" % (len(big), big)
    assert read_until(raw, expected) == expected
    for byte in b"*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n":  # one byte at a time
        raw.sendall(bytes([byte]))
        time.sleep(0.001)
    assert read_until(raw, b"$2\r\nhi\r\n") == b"$2\r\nhi\r\n"
    raw.sendall(b"  lpush   inline-list  a b  \r\nLRANGE inline-list 0 -1\r\n")
    assert read_until(raw, b":2\r\n*2\r\n$1\r\nb\r\n$1\r\na\r\n") == b":2\r\n*2\r\n$1\r\nb\r\n$1\r\na\r\n"
    raw.close()


@pytest.mark.parametrize("garbage, error", [
    (b"*2\r\n$3\r\nGET\r\n:5\r\n", b"expected '$'"),
    (b"*x\r\n", b"invalid multibulk length"),
    (b"*1\r\n$-3\r\n", b"invalid bulk length"),
])
def test_bytes_that_are_not_the_protocol_get_an_error_and_the_connection_closes(project, broker, read_loop, garbage,
                                                                                 error):
    raw = socket.create_connection(("127.0.0.1", broker))
    raw.sendall(resp_auth(project) + b"*1\r\n$4\r\nPING\r\n" + garbage)
    raw.settimeout(5)
    data = b""
    while chunk := raw.recv(1024):  # until the broker closes it
        data += chunk
    assert data.startswith(b"+OK\r\n+PONG\r\n-ERR Protocol error: "), data
    if read_loop["DIFY_LOCAL_BROKER_COMPILED"] == "true":  # (the Python loop has hiredis' words for it)
        assert error in data
    raw.close()
    client = redis.Redis(port=broker, password=project.broker_password)
    assert client.ping()  # the broker itself goes on


def test_without_the_compiled_loop_the_broker_says_so_and_serves_from_python(project):
    """A machine without a C compiler installs no extension: the broker warns once at start,
    naming why and what to do, and serves everything from the Python loop."""
    blocked = ("import sys; sys.modules['runner.broker._session'] = None; sys.argv[0] = 'dify-local'; "
               "from runner.cli import main; main()")
    proc = project.start(argv=[sys.executable, "-c", blocked, "serve", "broker"])
    warning = proc.wait_for_line(r"read loop runs in Python.*", timeout=30).group(0)
    assert "the C extension is not built" in warning and "C compiler" in warning
    proc.wait_for_line(r"Python read loop\) listening on", timeout=30)
    client = redis.Redis(port=project.broker_port, password=project.broker_password)
    client.rpush("q", "a", "b")
    assert client.brpop(["q"], timeout=5) == (b"q", b"b") and client.lrange("q", 0, -1) == [b"a"]


def test_an_extension_built_for_another_interface_is_not_used(monkeypatch):
    import types

    import runner.broker
    from runner.broker import session

    stale = types.ModuleType("runner.broker._session")
    stale.API = session.API + 1
    monkeypatch.setitem(sys.modules, "runner.broker._session", stale)
    monkeypatch.setattr(runner.broker, "_session", stale, raising=False)  # (imported already: the attribute)
    found, why = session.compiled_session()
    assert found is None and "reinstall dify-local to rebuild it" in why


def test_a_command_that_fails_inside_the_broker_costs_that_command_only(project, read_loop):
    """A fault of ours in a command (here reading a ZADD score, broken on purpose) is an error
    reply and a logged traceback; the connection and the broker go on."""
    broken = ("import sys; sys.argv[0] = 'dify-local'\n"
              "import runner.broker.scores, runner.broker.fast\n"
              "def broken(raw): raise RuntimeError('injected')\n"
              "runner.broker.scores.redis_double = runner.broker.fast.redis_double = broken\n"
              "from runner.cli import main; main()")
    proc = project.start(argv=[sys.executable, "-c", broken, "serve", "broker"], env=read_loop)
    wait_until(lambda: port_open(project.broker_port), 20, "the broker to listen")
    client = redis.Redis(port=project.broker_port, password=project.broker_password, single_connection_client=True)
    with pytest.raises(redis.ResponseError, match="internal error in the embedded broker"):
        client.execute_command("ZADD", "z", "1e3", "m")  # (a plain "1000" needs no reading)
    with client.pipeline() as pipe:  # the same inside a fast-path transaction
        pipe.set("k", "v").execute_command("ZADD", "z", "1e3", "m")
        with pytest.raises(redis.ResponseError, match="internal error"):
            pipe.execute()
    assert client.ping() and client.get("k") == b"v" and client.zadd("z", {"m": 1000}) == 1
    proc.wait_for_line(r"command b'(ZADD|EXEC)' failed", timeout=10)
    assert "RuntimeError: injected" in proc.output
