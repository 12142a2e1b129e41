"""Lua script families that exhaust: CPU (a script that never ends, however it hides its loop),
memory (a string or table that grows without bound), work done in Python for a script (packing or
answering a table that refers to itself 2^40 times over), and the interpreter's own limits (deep
recursion, a pattern deep enough to overflow the C stack). redis-server answers other clients BUSY
and waits for SCRIPT KILL, or crashes (the pattern); the embedded broker must stop the script with
an error, serve its other clients again, keep its memory bounded, and go on running scripts.

The broker runs with DIFY_LOCAL_BROKER_LUA_TIME_LIMIT=0.5 (CPU seconds), so each runaway costs this
shared machine half a second. Waits are on replies with generous deadlines, never on timings.
"""

from __future__ import annotations

import socket

import psutil
import pytest
import redis

from runner.broker.lua_sandbox import MEMORY_LIMIT
from tests.helpers import wait_until

TIME_LIMIT = "0.5"
# KiB the interpreter holds once collected (each full cycle halves Lua's concatenation buffer)
COLLECTED = "for i = 1, 10 do collectgarbage() end return collectgarbage('count')"
REPLY_DEADLINE = 120  # seconds: a stopped script's reply, on a machine six others share

RUNS_FOREVER = {
    "a bare loop": "while true do end",
    "a loop pcall keeps catching": "local function f() while true do end end while true do pcall(f) end",
    "a loop that catches its own stop":
        "while true do pcall(function() local x = 0 while true do x = x + 1 end end) end",
    "xpcall whose handler loops":
        "while true do xpcall(function() error('x') end, function() while true do end end) end",
    "a coroutine": "local co = coroutine.wrap(function() while true do end end) co()",
    "a coroutine resumed":
        "local co = coroutine.create(function() while true do end end) return coroutine.resume(co)",
    "nested coroutines":
        "coroutine.wrap(function() coroutine.wrap(function() while true do pcall(error) end end)() end)()",
    "a coroutine made before the loop":
        "local co = coroutine.create(function() while true do coroutine.yield() end end) "
        "while true do coroutine.resume(co) end",
    "recursion that never ends": "local function f() return f() end return f()",
    "a gsub callback": "return string.gsub('x', 'x', function() while true do end end)",
    "a sort comparator": "table.sort({3, 2, 1}, function(a, b) while true do end end)",
    "a __tostring": "return tostring(setmetatable({}, {__tostring = function() while true do end end}))",
    "an __index": "return setmetatable({}, {__index = function(t, k) while true do end end}).x",
    "an error the handler reads forever": "error(setmetatable({}, {__index = function() while true do end end}))",
    "a load reader that never ends": "return load(function() return 'x' end)",
    "a loop calling Redis": "while true do redis.call('INCR', 'counter') end",
    "cjson.encode of a table 2^40 wide": "local t = {} for i = 1, 40 do t = {t, t} end return cjson.encode(t)",
    "cmsgpack.pack of it": "local t = {} for i = 1, 40 do t = {t, t, t, t} end return cmsgpack.pack(t)",
    "replying it": "local t = {} for i = 1, 40 do t = {t, t} end return t",
}

TAKES_MEMORY = {
    "string.rep of 1 GiB": "return #string.rep('x', 2^30)",
    "string.rep of 2^31 - 1": "return #string.rep('x', 2^31 - 1)",
    "a table without end": "local t = {} for i = 1, 1e9 do t[i] = i end",
    "a string doubling": "local s = 'x' while true do s = s .. s end",
    "megabyte strings kept": "local s = string.rep('x', 2^20) local t = {} for i = 1, 1e6 do t[i] = s .. i end",
    "a table of tables": "local t = {} for i = 1, 1e9 do t[i] = {i} end",
    "table.concat of a big table": "local t = {} for i = 1, 2^22 do t[i] = 'abcdefgh' end "
                                   "local s = table.concat(t) return #(s .. s .. s .. s .. s .. s .. s .. s)",
    "cjson.decode of a huge document": "return cjson.decode('[' .. string.rep('1,', 2^23) .. '1]')",
}

LIMITS = {
    "recursion": "local function f() return 1 + f() end return f()",
    "pcall recursion": "local function f() return pcall(f) end return f()",
    "metamethod recursion": "return setmetatable({}, {__index = function(t, k) return t[k] end}).x",
    "an __index loop": "local t = setmetatable({}, {}) getmetatable(t).__index = t return t.x",
    "unpack of ten million": "return unpack({}, 1, 1e7)",
    "a format width": "return string.format('%99999d', 1)",
    "a pattern 200,000 items deep": "return string.find(string.rep('a', 200000), string.rep('a?', 200000))",
    "a capture pattern 20,000 deep": "return string.rep('a', 20000):match(string.rep('(a)', 20000))",
    "coroutine recursion": "local function f() coroutine.wrap(f)() end f()",
    "an error table without err": "error({x = 1})",  # (redis-server 7.0 crashes on this one)
    "an error that fails to print": "error(setmetatable({}, {__tostring = function() error('again') end}))",
    "a reply nested 100,000 deep": "local t = {} local c = t for i = 1, 100000 do c[1] = {} c = c[1] end return t",
    "a table holding itself": "local t = {} t[1] = t return cjson.encode(t)",
    "deep JSON": "return cjson.decode(string.rep('[', 100000))",
    "deep msgpack": "return cmsgpack.unpack(string.rep('\\145', 100000) .. '\\1')",
    "a chunk too deep to parse": "return loadstring('return ' .. string.rep('(', 100000))",
}


@pytest.fixture
def broker(project, read_loop):
    proc = project.serve_broker(env={**read_loop, "DIFY_LOCAL_BROKER_LUA_TIME_LIMIT": TIME_LIMIT})
    client = redis.Redis.from_url(project.broker_url, socket_timeout=REPLY_DEADLINE)
    yield project, client, psutil.Process(proc.popen.pid)
    client.close()


def send_raw(project, *command: str) -> socket.socket:
    """A connection that sends `command` (after AUTH) and does not wait for its reply."""
    password = redis.Redis.from_url(project.broker_url).connection_pool.connection_kwargs["password"]
    raw = socket.create_connection(("127.0.0.1", project.broker_port), timeout=REPLY_DEADLINE)
    parts = [b"AUTH", password.encode(), *[part.encode() for part in command]]
    auth, rest = parts[:2], parts[2:]
    raw.sendall(b"".join(encode(words) for words in (auth, rest)))
    return raw


def busy(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def encode(words: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(word), word) for word in words)


def read_reply(raw: socket.socket, replies: int) -> bytes:
    """The raw bytes of `replies` simple replies (+OK, -ERR …, :1): one line each."""
    data = b""
    while data.count(b"\r\n") < replies:
        chunk = raw.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("name", list(RUNS_FOREVER))
def test_a_script_that_runs_forever_is_stopped_and_others_served(broker, name):
    project, client, process = broker
    other = redis.Redis.from_url(project.broker_url, socket_timeout=REPLY_DEADLINE)
    other.ping()  # connected before the runaway starts
    before = busy(process)
    runaway = send_raw(project, "EVAL", RUNS_FOREVER[name], "0")
    try:
        wait_until(lambda: busy(process) > before + 0.1, REPLY_DEADLINE, "the script to be running")
        assert other.ping() is True  # answered once the script is stopped (never, were it not)
        reply = read_reply(runaway, 2)
    finally:
        runaway.close()
        other.close()
    assert reply.startswith(b"+OK\r\n-ERR Script killed"), reply[:300]
    assert b"DIFY_LOCAL_BROKER_LUA_TIME_LIMIT" in reply
    assert client.eval("return redis.call('PING')", 0) == b"PONG"  # and scripts run again


def test_functions_and_read_only_scripts_are_stopped_too(broker):
    project, client, _ = broker
    library = ("#!lua name=runaway\nredis.register_function('spin', function() while true do end end)\n"
               "redis.register_function{function_name='ro', callback=function() while true do end end, "
               "flags={'no-writes'}}")
    assert client.function_load(library) == b"runaway"
    for command in (["FCALL", "spin", "0"], ["FCALL_RO", "ro", "0"], ["EVAL_RO", "while true do end", "0"],
                    ["FUNCTION", "LOAD", "#!lua name=loads_forever\nwhile true do end"]):
        with pytest.raises(redis.ResponseError, match="Script killed") as stopped:
            client.execute_command(*command)
        assert "DIFY_LOCAL_BROKER_LUA_TIME_LIMIT" in str(stopped.value), command
    assert client.eval("return 1", 0) == 1
    assert "loads_forever" not in str(client.function_list())


def test_writes_before_the_stop_stay_written(broker):
    """redis-server would not stop a script that has written (only SHUTDOWN NOSAVE ends it); here
    the script stops, and what it wrote is kept, as the error says."""
    _, client, _ = broker
    with pytest.raises(redis.ResponseError, match="what it wrote before stays written"):
        client.eval("redis.call('SET', 'written', 'yes') while true do end", 0)
    assert client.get("written") == b"yes"


@pytest.mark.parametrize("name", list(TAKES_MEMORY))
def test_a_script_that_takes_memory_without_end_gets_an_error(broker, name):
    _, client, process = broker
    with pytest.raises(redis.ResponseError) as failed:
        client.eval(TAKES_MEMORY[name], 0)
    message = str(failed.value)
    assert "Lua memory" in message or "Script killed" in message or "more than the embedded broker" in message, \
        message
    # what the script held is collected, and the broker did not grow far past the bound
    assert client.eval(COLLECTED, 0) < 16 * 1024  # KiB
    assert process.memory_info().rss < 3 * MEMORY_LIMIT
    assert client.eval("return redis.call('PING')", 0) == b"PONG"


@pytest.mark.parametrize("name", list(LIMITS))
def test_the_interpreters_own_limits_are_errors_not_crashes(broker, name):
    _, client, process = broker
    try:
        client.eval(LIMITS[name], 0)
    except redis.ResponseError:
        pass  # an error is the answer (some of these are values on redis-server: any answer will do)
    assert process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    assert client.eval("return redis.call('PING')", 0) == b"PONG"


def test_memory_limit_is_per_interpreter_and_left_for_the_next_script(broker):
    """A script stopped at the memory bound leaves the interpreter as it found it: the next one
    gets the whole bound again (no garbage kept, no collector left stopped)."""
    _, client, _ = broker
    grow = "collectgarbage('stop') local t = {} for i = 1, 1e9 do t[i] = i end"
    for _ in range(3):
        with pytest.raises(redis.ResponseError, match="Lua memory"):
            client.eval(grow, 0)
        assert client.eval("local t = {} for i = 1, 1e6 do t[i] = i end return #t", 0) == 1000000
    assert client.eval(COLLECTED, 0) < 16 * 1024
