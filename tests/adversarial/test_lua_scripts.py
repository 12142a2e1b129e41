"""Lua script families: what a script may reach, write and load on the embedded broker, answered
script by script as redis-server 7 answers it (the Debian redis-server the tests run): an error
where it errors, with its text, and the same value where it does not.

Organised by kind: the globals a script sees, escapes to the host (os, io, require, debug,
setfenv, python …), writes to globals and library tables, metatable tricks, bytecode, Redis' own
API, the libraries Redis adds (bit, struct, cmsgpack, cjson), math.random's numbers, and the same
through EVAL_RO, SCRIPT LOAD and Redis Functions. Each kind runs on a fresh pair of servers, on both
of the broker's read loops, script after script in the same order on both (so math.random's
sequence stays in step). A row marked ERROR_ONLY is an error on both whose text is fakeredis' or
lupa's, not Redis'. Escape attempts also try to leave a file behind; none may appear.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lupa.lua51
import pytest
import redis

ERROR_ONLY = "error only"


@dataclass(frozen=True)
class Case:
    script: str
    compare: str = "exact"
    keys: tuple[str, ...] = ()
    args: tuple[str, ...] = ()


def cases(*rows) -> list[Case]:
    return [row if isinstance(row, Case) else Case(row) for row in rows]


def names_and_types(table: str) -> str:
    return (f"local t = {{}} for k, v in pairs({table}) do t[#t + 1] = tostring(k) .. '=' .. type(v) end "
            "table.sort(t) return t")


ABSENT = ["os", "io", "require", "dofile", "loadfile", "package", "debug", "setfenv", "getfenv", "module", "print",
          "newproxy", "python", "jit", "arg", "_ENV", "bit32", "utf8"]
LIBRARIES = ["_G", "string", "math", "table", "coroutine", "redis", "cjson", "cmsgpack", "bit", "struct",
             "getmetatable('')", "getmetatable(_G)"]

GLOBALS = cases(
    *[names_and_types(name) for name in LIBRARIES],
    *[f"return type({name})" for name in ABSENT],
    *[f"return type(rawget(_G, '{name}'))" for name in ABSENT],
    "return _VERSION",
    Case("return {type(KEYS), type(ARGV), #KEYS, #ARGV, KEYS[1], ARGV[2]}", keys=("k1",), args=("a1", "a2")),
    "return {type(redis.call), type(redis.pcall), type(cjson.null), type(__redis__err__handler)}",
    "return type(redis.REDIS_VERSION) .. type(redis.REDIS_VERSION_NUM)",
    "return tostring(getmetatable(string)) .. tostring(getmetatable(redis)) .. tostring(getmetatable(cjson.null))",
)

MARKER = "{marker}"  # replaced by a path the escapes try to create
ESCAPES = cases(
    f"os.execute('touch {MARKER}') return 1",
    "return os.getenv('HOME')",
    "os.exit(1)",
    f"return os.remove('{MARKER}')",
    "return os.time()",
    f"local f = io.open('{MARKER}', 'w') f:write('x') f:close() return 1",
    f"return io.popen('touch {MARKER}'):read('*a')",
    "return io.lines('/etc/passwd')()",
    "io.write('x') return 1",
    "return require('os')",
    "return require",
    "return dofile('/etc/hostname')",
    "return loadfile('/etc/hostname')",
    "return package.loadlib('libc.so.6', 'system')",
    "return package.loaded.os",
    "return debug.getregistry()",
    "return debug.getinfo(1)",
    "return debug.getupvalue(redis.call, 1)",
    "debug.sethook() return 1",
    "setfenv(1, {}) return 1",
    "return getfenv(0)",
    "return getfenv(redis.call)",
    "return module('x')",
    "print('x') return 1",
    "return newproxy(true)",
    "return python.builtins",
    "return python.eval('1')",
    "return jit",
    f"return loadstring(\"os.execute('touch {MARKER}') return 1\")()",
    "return loadstring('return io')()",
    "return loadstring('return getfenv(0)')()",
    "return loadstring('return require')()",
    "local f, e = loadstring('return os.execute') return type(f)",
    "local done = false return load(function() if done then return nil end done = true return 'return os' end)()",
    "local chunk = load(function() return nil end) return type(chunk)",
    f"local ok, e = pcall(function() return os.execute('touch {MARKER}') end) return {{tostring(ok), e}}",
    f"local ok, e = xpcall(function() return io.open('{MARKER}', 'w') end, function(m) return m end) "
    "return {tostring(ok), e}",
    # (inside a coroutine a Python function's error names no line: lupa runs Python's calls back
    # into Lua on the main thread, whose stack is not the coroutine's)
    Case("local co = coroutine.wrap(function() return os end) return co()", ERROR_ONLY),
    Case("local co = coroutine.create(function() return debug end) local ok, e = coroutine.resume(co) "
         "return {tostring(ok), e ~= nil}"),
    "return string.gsub('x', 'x', os.execute)",
    "return ('x'):gsub('x', function() return io end)",
    "return table.concat({'a', 'b'}, python)",
    "return select('#', string.dump(function() return 1 end)) == 1",
    Case("return cjson.null.__class__", ERROR_ONLY),
    Case("return cjson.null.__init__.__globals__", ERROR_ONLY),
    "return redis.call.__globals__",
    "return redis.log.func",
    "return collectgarbage('count') > 0",
    "return collectgarbage()",
    "collectgarbage('stop') collectgarbage('restart') return collectgarbage('step')",
    "return gcinfo() > 0",
    "return setmetatable({}, {__index = function(t, k) return os end}).x",
)

WRITES = cases(
    "x = 1 return 1",
    "_G.x = 1 return 1",
    "_G['x'] = 1 return 1",
    "rawset(_G, 'x', 1) return 1",
    "local t = _G t.x = 1 return 1",
    "setmetatable(_G, nil) return 1",
    "setmetatable(_G, {}) return 1",
    "redis = nil return 1",
    "KEYS = {} return 1",
    "redis.call = nil return 1",
    "redis.x = 1 return 1",
    "string.rep = nil return 1",
    *[f"{name}.x = 1 return 1"
      for name in ("string", "math", "table", "coroutine", "cjson", "cmsgpack", "bit", "struct")],
    "table.insert(_G, 1) return 1",
    "table.insert(string, 1) return 1",
    "table.remove(string) return 1",
    "table.sort(math) return 1",
    "rawset(string, 'x', 1) return 1",
    "rawset(redis, 'call', print) return 1",
    "getmetatable(_G).__index = nil return 1",
    "getmetatable(_G).__newindex = function() end return 1",
    "local function f() y = 2 end f() return 1",
    "loadstring('z = 3')() return 1",
    "local co = coroutine.wrap(function() w = 4 end) co() return 1",
    Case("KEYS[1] = 'changed' KEYS[2] = 'added' return KEYS", keys=("k",)),
    Case("ARGV.x = 1 table.insert(ARGV, 'y') return ARGV", args=("a",)),
    "local t = {} t.x = 1 rawset(t, 'y', 2) setmetatable(t, {}) return {t.x, t.y}",
    # nothing above stayed for the scripts after it
    "return {type(rawget(_G, 'x')), type(rawget(_G, 'y')), type(rawget(_G, 'z')), type(rawget(_G, 'w'))}",
    "return {type(string.x), type(redis.x), type(string.rep), type(redis.call), type(math.x)}",
    "return redis.call('PING')",
    "return #KEYS",
)

METATABLES = cases(
    "return type(getmetatable(''))",
    "getmetatable('').__index = {} return 1",
    "getmetatable('').__index.x = 1 return 1",
    "getmetatable('').__index.rep = nil return 1",
    "getmetatable('').__add = function() end return 1",
    "rawset(getmetatable(''), '__index', {}) return 1",
    "setmetatable(getmetatable(''), {}) return 1",
    "return rawequal(getmetatable('').__index, string)",
    "return getmetatable('') == string",
    "return ('x'):rep(3) .. ('abc'):upper() .. #('abc'):sub(2)",
    "return type(getmetatable(_G))",
    "return type(getmetatable(_G).__index)",
    "return getmetatable(_G).__index(_G, 'os')",
    "return getmetatable(_G).__index(_G, 'redis')",
    "local t = setmetatable({}, {__metatable = 'locked'}) return getmetatable(t)",
    "local t = setmetatable({}, {__metatable = 'locked'}) setmetatable(t, {}) return 1",
    "return tostring(setmetatable({}, {__tostring = function() return 'shown' end}))",
    "return setmetatable({}, {__index = function() return 7 end}).anything",
    Case("setmetatable(KEYS, {__index = function() return 'default' end}) return KEYS[5]", keys=("k",)),
    "return getmetatable(cjson.null)",
    Case("return cjson.null.x", ERROR_ONLY),
    Case("cjson.null.x = 1 return 1", ERROR_ONLY),
    "return cjson.null == cjson.null",
    "return getmetatable(redis.call)",
    "return getmetatable(1)",
    "return getmetatable(nil)",
    "return getmetatable()",
    "return getmetatable(coroutine.create(function() end))",
)

REDIS_API = cases(
    "return redis.call('SET', 'k', 'v')",
    "return redis.call('GET', 'k')",
    "return redis.call('nosuch')",
    "local r = redis.call('nosuch') return r",
    "return redis.call('GET')",
    "local r = redis.call('GET', 'a', 'b') return r",
    "local r = redis.call('LPUSH', 'k', 'x') return r",
    "local r = redis.call('EVAL', 'return 1', 0) return r",
    "local r = redis.call() return r",
    "local r = redis.call({}) return r",
    "local r = redis.call('SET', 'n', 1.5) return redis.call('GET', 'n')",
    "return redis.pcall('nosuch')",
    "return redis.pcall('GET').err",
    "return {pcall(redis.call, 'nosuch')}",
    "local ok, e = pcall(redis.call, 'nosuch') return e",
    "local ok, e = pcall(error, {err = 'MY own'}) return e",
    "local ok, e = pcall(error, {err = 5}) return e",
    "local ok, e = pcall(error, {other = 5}) return type(e)",
    "return redis.error_reply('x').err",
    "return redis.error_reply('-x').err",
    "return redis.error_reply('MY bad').err",
    "return redis.error_reply('x')",
    "return redis.error_reply()",
    "return redis.error_reply(1).err",
    "return redis.status_reply('fine')",
    "return redis.status_reply('-x').ok",
    "return redis.status_reply()",
    "return {ok = 'two\\r\\nlines'}",
    "return {err = 'MY error'}",
    "return {err = 'x', 5}",
    "return {1, {2, {3, 'x'}}, 'y'}",
    "return {1, nil, 3}",
    "return {1, 2.5, -3.7, 'x', true, false}",
    "return true", "return false", "return nil", "return 3.9", "return -3.9", "return '3.9'",
    "return 2^53 + 1", "return 2^62", "return 2^63", "return -2^63", "return 1/0", "return -1/0", "return 0/0",
    "error('boom')", "error('boom', 0)", "error('boom', 2)", "error({err = 'MYERR custom'})", "error({err = '-MY x'})",
    "error()", "error(1)", "local function f() error('deep') end f()", "assert(false, 'asserted')", "assert(nil)",
    "return redis.sha1hex('')", "return redis.sha1hex(1)", "return redis.sha1hex()",
    "return redis.setresp(4)", "return redis.setresp()", "redis.setresp(3) return 1", "return redis.setresp('2')",
    "redis.log(redis.LOG_WARNING, 'from a script') return 1", "return redis.log(1)", "return redis.log(99, 'x')",
    "return redis.set_repl()", "return redis.set_repl(99)", "redis.set_repl(redis.REPL_ALL) return 1",
    "return redis.acl_check_cmd('get', 'x')", "return redis.acl_check_cmd('nosuch')", "return redis.acl_check_cmd()",
    "return redis.breakpoint()", "redis.debug('x') return 1", "return redis.replicate_commands()",
    "return {redis.REPL_NONE, redis.REPL_AOF, redis.REPL_SLAVE, redis.REPL_REPLICA, redis.REPL_ALL, redis.LOG_DEBUG, "
    "redis.LOG_VERBOSE, redis.LOG_NOTICE, redis.LOG_WARNING}",
    "return redis.REDIS_VERSION_NUM > 0x070000",
    "return tostring(__redis__err__handler('x').err)",
    "return __redis__err__handler({err = 'y'}).err",
    "return select('#', ...)",
    "return +",
    "return 1 end",
    "\x1bLua",
    "local x = ",
)

BYTECODE = cases(
    "return type(loadstring(string.dump(function() return 1 end)))",
    "local f, e = loadstring(string.dump(function() return 1 end)) return e",
    "local f, e = loadstring(string.dump(function() return 1 end), 'named') return e",
    "local s = string.dump(function() return 1 end) local done = false "
    "local f, e = load(function() if done then return nil end done = true return s end) return e",
    "local s = string.dump(function() return 1 end) local i = 0 "
    "local f, e = load(function() i = i + 1 return s:sub(i, i) end) return e",
    "local f, e = loadstring('\\27Lua') return e",
    "local f, e = loadstring('\\27') return e",
    "return loadstring('\\27LuaQ\\0\\1\\4\\8\\4\\8\\0')",
    "local f, e = loadstring(' \\27Lua') return e",
    "return loadstring(string.dump(loadstring('return 1')))",
    "local f, e = load(function() return {} end) return e",
    "local f, e = load(function() error('in reader') end) return e",
    "return load('return 1')",
    "return loadstring()",
    "return loadstring({})",
    "return loadstring('return 1', {})",
    "return loadstring('return 8', '=named')()",
    "return loadstring(7)",
    "local f = loadstring('error(\"inner\")', '@chunk') f()",
    "local f = loadstring('return 1 +') return f",
    "local f, e = loadstring('return 1 +') return e",
)

LIBRARY_CALLS = cases(
    "return {bit.tobit(2^32 + 5), bit.bnot(0), bit.lshift(1, 33), bit.rshift(-1, 28), bit.arshift(-256, 4), "
    "bit.tohex(-1, -4), bit.tohex(255), bit.tohex(1, 12), bit.bswap(0x12345678), bit.rol(0x80000001, 1), "
    "bit.ror(1, 1), bit.tobit(1.5), bit.tobit(2.5), bit.tobit(-1.5), bit.band(0xff, 0x0f, 0x3), bit.bor(1, 2, 4), "
    "bit.bxor(7, 2), bit.tobit('12'), bit.band('0x10', 0xff)}",
    "return bit.band('x')", "return bit.band()", "return bit.lshift(1)", "return bit.tohex({})",
    "return struct.pack('>i2hxBs', 7, -2, 200, 'ab')",
    "return {struct.unpack('<iH', struct.pack('<iH', -5, 9))}",
    "return {struct.unpack('>I4i8', struct.pack('>I4i8', 4000000000, -2))}",
    "return {struct.unpack('!4bi', struct.pack('!4bi', 1, 2))}",
    "return {struct.unpack('c0', struct.pack('c0', 'hello'))}",
    "return {struct.unpack('bc0', struct.pack('b', 3) .. 'abcdef')}",
    "return {struct.unpack('s', 'abc\\0def')}",
    "return {struct.unpack('>d<f', struct.pack('>d<f', 1.5, -2.25))}",
    "return struct.size('!4bi')", "return struct.size('>l<hT')",
    "return struct.pack('q', 1)", "return struct.pack('i33', 1)", "return struct.pack('!3i', 1)",
    "return struct.pack('c5', 'ab')", "return struct.pack('i')", "return struct.unpack('i', 'ab')",
    "return struct.unpack('s', 'abc')", "return struct.unpack('i', 'abcd', 9)", "return struct.size('s')",
    "return struct.size('c0')", "return struct.pack()", "return struct.unpack('i9999999999', '')",
    "return cmsgpack.pack({1, 2, {a = 1}}, 'x', true, nil, 1.5, -1, 300, -300, 2^40, -2^40, 0.1)",
    "return cmsgpack.pack(string.rep('x', 40), string.rep('y', 300))",
    "local t = {} for i = 1, 20 do t[i] = i end return cmsgpack.pack(t)",
    "local t = {} t[1] = t return cmsgpack.pack(t)",
    "return {cmsgpack.unpack(cmsgpack.pack({1, 2, 3}, 'x', 5))}",
    "return {cmsgpack.unpack_one(cmsgpack.pack(1, 2, 3))}",
    "return {cmsgpack.unpack_one(cmsgpack.pack(1, 2, 3), 2)}",
    "return {cmsgpack.unpack_limit(cmsgpack.pack(1, 2, 3), 2)}",
    "return {cmsgpack.unpack_limit(cmsgpack.pack(1, 2, 3), 2, 1)}",
    "return cmsgpack.unpack('\\193')", "return cmsgpack.unpack('\\220\\0')", "return cmsgpack.unpack('\\146\\1')",
    "return cmsgpack.unpack('')", "return select('#', cmsgpack.unpack(''))", "return cmsgpack.pack()",
    "return cmsgpack.unpack_one('\\1', 5)", "return cmsgpack.unpack_one('\\1', -1)",
    "return cmsgpack.unpack(cmsgpack.pack({[1] = 'a', x = 'b'})).x",
    "return cjson.encode({'a/b', '\\1', '\\127', '\\255', 'x\"y', 'a\\\\b', '\\n\\t\\r\\b\\f'})",
    "return cjson.encode({1.5, 1e20, 123456789012345, 0.1, 2^53})",  # (not -0: lupa hands Python 0)
    "return cjson.encode({a = 1})", "return cjson.encode({[1.5] = 1})", "return cjson.encode({[true] = 1})",
    "return cjson.encode(function() end)", "return cjson.encode(coroutine.create(function() end))",
    "return cjson.encode()", "return cjson.encode(1, 2)", "return cjson.encode(0/0)", "return cjson.encode(1/0)",
    "return cjson.encode({[10] = 1})", "return cjson.encode({[11] = 1})", "return cjson.encode({[2] = 1, [3] = 1})",
    "return cjson.encode({})", "return cjson.encode({1, nil, 3})", "return cjson.encode('\\0')",
    "return cjson.encode(cjson.null)", "return cjson.encode({a = cjson.null})", "return cjson.encode(nil)",
    "local t = {} t[1] = t return cjson.encode(t)",
    "local t = {} for i = 1, 2000 do t = {t} end return cjson.encode(t)",
    "return cjson.encode(cjson.decode('{\"a\":{\"b\":[1,2]}}'))",
    "return cjson.decode('[1, null, 3]')[3]", "return #cjson.decode('[1, null, 3]')",
    "return cjson.decode('null') == cjson.null", "return cjson.decode('\"\\\\u00e9\"')", "return cjson.decode(1)",
    "return cjson.decode('x')", "return cjson.decode()", "return cjson.decode(string.rep('[', 2000))",
    Case("return cjson.decode('[1,2')", ERROR_ONLY),
    "return {cjson._NAME, cjson._VERSION, cmsgpack._NAME, cmsgpack._VERSION, cmsgpack._COPYRIGHT, "
    "cmsgpack._DESCRIPTION}",
    "return {cjson.encode_max_depth(), cjson.decode_max_depth(), cjson.encode_number_precision(), "
    "cjson.encode_keep_buffer(), cjson.decode_invalid_numbers()}",
    "return {cjson.encode_sparse_array()}",
    "return type(cjson.new())",
)

RANDOM = cases(
    "return {math.random(1000000), math.random(1000000), math.random(10, 20), math.random(5)}",
    "return math.random() < 1",
    "return tostring(math.random())",
    "return math.random(0)", "return math.random(3, 2)", "return math.random(1, 2, 3)", "return math.random('x')",
    "return math.random(2.9)", "return math.random('7')",
    "math.randomseed(7) return {math.random(100), math.random(100)}",
    "math.randomseed(-3) return math.random(1000)",
    "return math.random(1000000)",
    "return math.randomseed()",
    "return {math.floor(3.7), math.max(1, 9, 3), math.huge > 0, math.fmod(7, 3), math.pi > 3}",
)


def bytecode() -> bytes:
    """A compiled chunk (Lua 5.1's, as redis-server's Lua would load if it loaded bytecode)."""
    return lupa.lua51.LuaRuntime(encoding=None).eval("string.dump(function() return 1 end)")


def reply(client: redis.Redis, *command):
    try:
        return client.execute_command(*command)
    except redis.ResponseError as error:
        return ("error", str(error))


def answer(client: redis.Redis, case: Case, marker: Path):
    script = case.script.replace(MARKER, str(marker))
    result = reply(client, "EVAL", script, len(case.keys), *case.keys, *case.args)
    if case.compare == ERROR_ONLY and isinstance(result, tuple):
        return ("error",)
    return result


@pytest.fixture
def pair(project, redis_server, read_loop, tmp_path):
    """The embedded broker and redis-server, each fresh, with a path an escape would create."""
    project.serve_broker(env=read_loop)
    embedded = redis.Redis.from_url(project.broker_url)
    real = redis.Redis.from_url(redis_server + "/1")
    yield embedded, real, tmp_path / "pwned"
    embedded.close()
    real.close()


KINDS = {"globals": GLOBALS, "escapes": ESCAPES, "global-writes": WRITES, "metatables": METATABLES,
         "redis-api": REDIS_API, "bytecode": BYTECODE, "libraries": LIBRARY_CALLS, "random": RANDOM}


@pytest.mark.parametrize("kind", list(KINDS))
def test_scripts_answer_as_redis_does(pair, kind):
    embedded, real, marker = pair
    mismatches = []
    for case in KINDS[kind]:
        ours, theirs = answer(embedded, case, marker), answer(real, case, marker)
        if ours != theirs:
            mismatches.append(f"{case.script!r}\n    embedded: {ours!r}\n    redis:    {theirs!r}")
    assert not mismatches, f"{len(mismatches)} of {len(KINDS[kind])} scripts answered differently:\n" + \
        "\n".join(mismatches)
    assert not marker.exists(), "a script wrote a file on the host"


def test_every_global_redis_gives_and_no_other(pair):
    """The set of names in _G, compared with redis-server's, name by name (and each one's type)."""
    embedded, real, _ = pair
    script = names_and_types("_G")
    ours, theirs = set(reply(embedded, "EVAL", script, 0)), set(reply(real, "EVAL", script, 0))
    assert ours == theirs, f"only here: {sorted(ours - theirs)}; only on redis-server: {sorted(theirs - ours)}"


ENTRY_POINTS = [
    # (what, the command sent, compared as)
    ("EVAL_RO reads", ["EVAL_RO", "return redis.call('GET', 'k')", 0], "exact"),
    ("EVAL_RO refuses a write", ["EVAL_RO", "return redis.call('SET', 'k', 'v')", 0], "exact"),
    ("EVAL_RO escape", ["EVAL_RO", "return os.execute('id')", 0], "exact"),
    ("EVAL_RO global write", ["EVAL_RO", "x = 1", 0], "exact"),
    ("SCRIPT LOAD of a syntax error", ["SCRIPT", "LOAD", "return +"], "exact"),
    ("SCRIPT LOAD of bytecode", ["SCRIPT", "LOAD", "bytecode"], "exact"),
    ("EVAL of bytecode", ["EVAL", "bytecode", 0], "exact"),
    ("SCRIPT LOAD of an escape", ["SCRIPT", "LOAD", "return os.execute('id')"], "exact"),
    ("EVALSHA of it", ["EVALSHA", "sha:return os.execute('id')", 0], "exact"),
    ("EVALSHA_RO of it", ["EVALSHA_RO", "sha:return os.execute('id')", 0], "exact"),
    ("SCRIPT KILL with none running", ["SCRIPT", "KILL"], "exact"),
    ("FUNCTION KILL with none running", ["FUNCTION", "KILL"], "exact"),
]


def resolve(argument):
    if argument == "bytecode":
        return bytecode()
    if isinstance(argument, str) and argument.startswith("sha:"):
        import hashlib

        return hashlib.sha1(argument[4:].encode()).hexdigest()
    return argument


def test_every_way_into_a_script_is_sandboxed(pair):
    """EVAL_RO, EVALSHA(_RO) after SCRIPT LOAD, bytecode through each, and the KILL commands."""
    embedded, real, _ = pair
    mismatches = []
    for what, command, _compare in ENTRY_POINTS:
        arguments = [resolve(argument) for argument in command]
        ours, theirs = reply(embedded, *arguments), reply(real, *arguments)
        if ours != theirs:
            mismatches.append(f"{what}: embedded {ours!r}, redis {theirs!r}")
    assert not mismatches, "\n".join(mismatches)


FUNCTION_BODIES = {
    "globals": names_and_types("_G"),
    "absent": "return type(os)",
    "python": "return type(python)",
    "require": "return require('os')",
    "loaded_chunk": "return loadstring('return type(redis)')()",
    "loaded_escape": "return loadstring('return type(io)')()",
    "bytecode": "local f, e = loadstring(string.dump(function() end)) return e",
    "write": "x = 1 return 1",
    "library_write": "string.x = 1 return 1",
    "redis_write": "redis.x = 1 return 1",
    "string_meta": "getmetatable('').__index = {} return 1",
    "keys": "return #keys",
    "call": "return redis.call('SET', 'fk', 'v')",
    "bit": "return bit.band(5, 3)",
    "struct": "return struct.pack('>h', 1)",
    "cmsgpack": "return cmsgpack.pack(1)",
    "cjson": "return cjson.encode({1, 2})",
    "random": "return math.random(1000)",
}


def test_functions_run_in_the_same_sandbox(pair):
    """Redis Functions are Lua too: a library's functions see what redis-server's see."""
    embedded, real, _ = pair
    library = "#!lua name=probe\n" + "\n".join(
        f"redis.register_function('{name}', function(keys, args) {body} end)" for name, body in FUNCTION_BODIES.items())
    for client in (embedded, real):
        assert reply(client, "FUNCTION", "LOAD", "REPLACE", library) == b"probe"
    mismatches = []
    for name, body in FUNCTION_BODIES.items():
        ours, theirs = reply(embedded, "FCALL", name, 0), reply(real, "FCALL", name, 0)
        if isinstance(ours, tuple) and isinstance(theirs, tuple):
            ours, theirs = ours[:1], theirs[:1]  # fakeredis' engine places errors in its own words
        if ours != theirs:
            mismatches.append(f"{name} ({body}): embedded {ours!r}, redis {theirs!r}")
    for what, code in [("escape at load", "#!lua name=bad1\nos.execute('id')"),
                       ("python at load", "#!lua name=bad2\nlocal x = python.builtins"),
                       ("bytecode library", b"#!lua name=bad3\n" + bytecode()),
                       ("global write at load", "#!lua name=bad4\nx = 1")]:
        ours, theirs = reply(embedded, "FUNCTION", "LOAD", code), reply(real, "FUNCTION", "LOAD", code)
        if not (isinstance(ours, tuple) and isinstance(theirs, tuple)):
            mismatches.append(f"{what}: embedded {ours!r}, redis {theirs!r}")
    assert not mismatches, "\n".join(mismatches)
