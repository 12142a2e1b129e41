"""Redis' Lua sandbox, for the embedded broker's scripts (EVAL, EVALSHA, EVAL_RO, SCRIPT LOAD,
FCALL, FUNCTION LOAD).

fakeredis runs scripts in a lupa runtime holding Lua's whole standard library and lupa's `python`
module, so any client with the password could run `os.execute`, `io.open`, `require`,
`python.builtins`, or load bytecode (which reads and writes the process' memory). Here a script gets
what redis-server 7 gives it, and nothing else:

- the same globals (`SCRIPT_GLOBALS`, with redis-server's `bit`, `struct`, `cmsgpack` and `cjson`:
  lua_libraries.py); `_G`, every library table and the string metatable read-only ("Attempt to
  modify a readonly table"); reading a missing global is an error, as in Redis;
- text only: `load`, `loadstring` and EVAL itself read a chunk starting with "\\27" as text, which
  fails to parse, as Redis' Lua does (so no bytecode);
- Redis' error replies ("… script: <sha>, on @user_script:1."), its `pcall` (an error table's
  message), its `math.random` generator, and its `redis.*`;
- no Python object but `cjson.null`, and no attribute of that (lupa's attribute filter).

And two bounds redis-server does not have, because here the interpreter shares the process and its
event loop with the data: a script (or a function, or a library's load) that runs for more than
DIFY_LOCAL_BROKER_LUA_TIME_LIMIT seconds of CPU is stopped with an error, so the broker serves its
other clients again (redis-server answers them BUSY and waits for SCRIPT KILL); what the script
wrote before it was stopped stays written. Each interpreter may hold `MEMORY_LIMIT` bytes; beyond,
the script fails with an error and the memory is collected.

One interpreter for scripts and one for functions (Redis keeps them apart too), each made once per
server; a script is compiled once and kept by its SHA1 (kombu's EVALSHA).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Callable

import lupa.lua51 as lua
from fakeredis import _msgs as msgs
from fakeredis._command_args_parsing import Int
from fakeredis._commands import command
from fakeredis._helpers import SimpleError, SimpleString
from fakeredis.commands_mixins._lua_functions import _ENGINE_SOURCE, FunctionsEngine, _sha1hex
from fakeredis.commands_mixins.scripting_mixin import REDIS_LOG_LEVELS_TO_LOGGING, _lua_cjson_null

from runner.broker.lua_libraries import libraries
from runner.settings.table import BY_NAME

log = logging.getLogger("dify_local.broker")

MEMORY_LIMIT = 256 * 1024 * 1024  # bytes each interpreter may hold (scripts; functions)
DEFAULT_TIME_LIMIT = BY_NAME["DIFY_LOCAL_BROKER_LUA_TIME_LIMIT"].default
HOOK_INSTRUCTIONS = 100_000  # between two looks at the clock (as redis-server's own hook)
COMPILED_KEPT = 1000  # compiled scripts kept by SHA1; beyond, the oldest goes
MEMORY_ERROR = "ERR Script used more than the embedded broker's {} MiB of Lua memory"
KILLED = ("ERR Script killed: it ran for more than {:g} s of CPU (the embedded broker's limit, "
          "DIFY_LOCAL_BROKER_LUA_TIME_LIMIT); what it wrote before stays written")
STOPPED = "Script killed: it ran for too long"  # what Lua raises; the broker answers KILLED
INTERNAL = "ERR internal error in the embedded broker (see its log)"
STACK_LIMIT = "ERR reached lua stack limit"

# What a script's _G holds on redis-server 7 (KEYS and ARGV are set for each call).
SCRIPT_GLOBALS = (
    "_G", "_VERSION", "__redis__err__handler", "assert", "bit", "cjson", "cmsgpack", "collectgarbage",
    "coroutine", "error", "gcinfo", "getmetatable", "ipairs", "load", "loadstring", "math", "next", "pairs",
    "pcall", "rawequal", "rawget", "rawset", "redis", "select", "setmetatable", "string", "struct", "table",
    "tonumber", "tostring", "type", "unpack", "xpcall")
# What a function's globals take from the sandbox (its _G and redis are the functions engine's).
FUNCTION_GLOBALS = tuple(name for name in SCRIPT_GLOBALS if name not in ("_G", "__redis__err__handler", "redis"))

# The sandbox, in Lua. It runs once per interpreter, with the real standard library still in reach,
# and keeps what it needs as locals, which no script can reach (no debug, getfenv, or bytecode).
# Chunks a script loads get the sandbox's globals; the script-facing names in the interpreter's
# real globals are replaced too, for the functions engine (which copies them).
SANDBOX_LUA = r"""
local bridge, python_libraries, hook_instructions = ...

local type, tostring, tonumber, select, error, unpack = type, tostring, tonumber, select, error, unpack
local next, rawget, rawset, setmetatable, getmetatable = next, rawget, rawset, setmetatable, getmetatable
local pcall, xpcall, loadstring, setfenv, collectgarbage = pcall, xpcall, loadstring, setfenv, collectgarbage
local getinfo, sethook, getupvalue, rawmetatable = debug.getinfo, debug.sethook, debug.getupvalue, debug.getmetatable
local clock = os.clock
local byte, match, format = string.byte, string.match, string.format
local floor = math.floor
local concat, insert, remove, sort = table.concat, table.insert, table.remove, table.sort
local real_globals = _G

-- Read-only tables, as Redis' Lua has them: an empty view over the table, refusing every write.
local READONLY = "Attempt to modify a readonly table"
local behind = {}  -- view -> the table it shows
local shown = {}   -- view -> what getmetatable answers for it (nil for a library)

local function refuse()
  error(READONLY, 2)
end

local function readonly(t, meta)
  local view = setmetatable({}, {__index = t, __newindex = refuse, __metatable = false})
  behind[view], shown[view] = t, meta
  return view
end

local function copy(t)
  local result = {}
  for k, v in next, t do result[k] = v end
  return result
end

local function got(count, n, value)  -- the type Lua names in "got ...": "no value" past the last argument
  if n > count then return "no value" end
  return type(value)
end

local function argerror(n, name, expected, got_type)
  return format("bad argument #%d to '%s' (%s expected, got %s)", n, name, expected, got_type)
end

-- The base functions a script calls instead of those that would see through a read-only view.
local base = {}

function base.rawset(...)
  if behind[(...)] ~= nil then error(READONLY, 0) end
  return rawset(...)
end

function base.rawget(t, ...)
  local b = behind[t]
  if b ~= nil then return rawget(b, ...) end
  return rawget(t, ...)
end

function base.next(t, ...)
  local b = behind[t]
  if b ~= nil then return next(b, ...) end
  return next(t, ...)
end

function base.pairs(...)
  local t = ...
  if type(t) ~= "table" then error(argerror(1, "pairs", "table", got(select("#", ...), 1, t)), 2) end
  return base.next, t, nil
end

function base.setmetatable(...)
  if behind[(...)] ~= nil then error(READONLY, 0) end
  return setmetatable(...)
end

local string_meta = getmetatable("")
local string_meta_view

function base.getmetatable(...)
  if select("#", ...) == 0 then error("bad argument #1 to 'getmetatable' (value expected)", 2) end
  local v = ...
  if behind[v] ~= nil then return shown[v] end
  local kind = type(v)
  if kind == "string" then return string_meta_view end
  if kind == "userdata" then return nil end  -- cjson.null: Redis' is a light userdata, without one
  return getmetatable(v)
end

-- Redis' pcall: an error table's message (what redis.call raises) comes back as the error.
local function caught(ok, ...)
  if ok then return true, ... end
  local err = ...
  if type(err) == "table" then
    local message = err.err
    local kind = type(message)
    if kind == "string" or kind == "number" then return false, message end
  end
  return false, err
end

function base.pcall(...)
  if select("#", ...) == 0 then error("bad argument #1 to 'pcall' (value expected)", 2) end
  return caught(pcall(...))
end

-- Text only: Redis' Lua parses every chunk, so one starting with "\27" (bytecode) is a syntax error.
local chunk_env  -- where the chunks a script loads find their globals

local function compile(text, name)
  if byte(text, 1) == 27 then text = " " .. text end  -- read as text: "unexpected symbol near 'char(27)'"
  local chunk, err = loadstring(text, name)
  if chunk ~= nil then setfenv(chunk, chunk_env) end
  return chunk, err
end

local function check_name(count, n, name, fname)
  local kind = type(name)
  if n <= count and name ~= nil and kind ~= "string" and kind ~= "number" then
    error(argerror(n, fname, "string", kind), 3)
  end
end

function base.loadstring(...)
  local count, text, name = select("#", ...), ...
  local kind = type(text)
  if kind ~= "string" and kind ~= "number" then error(argerror(1, "loadstring", "string", got(count, 1, text)), 2) end
  check_name(count, 2, name, "loadstring")
  text = tostring(text)
  if name == nil then name = text end
  return compile(text, tostring(name))
end

function base.load(...)
  local count, reader, name = select("#", ...), ...
  if type(reader) ~= "function" then error(argerror(1, "load", "function", got(count, 1, reader)), 2) end
  check_name(count, 2, name, "load")
  if name == nil then name = "=(load)" end
  local pieces, n = {}, 0
  while true do
    local ok, piece = pcall(reader)
    if not ok then return nil, piece end
    if piece == nil or piece == "" then break end
    local kind = type(piece)
    if kind ~= "string" and kind ~= "number" then return nil, "reader function must return a string" end
    n = n + 1
    pieces[n] = piece
  end
  return compile(concat(pieces), tostring(name))
end

-- redis-server's math.random: its own 48-bit generator (POSIX lrand48's), seeded when the server
-- starts and by math.randomseed only, so a script draws the numbers redis-server would give it.
local x0, x1, x2 = 0x330E, 0xABCD, 0x1234

local function lrand48()
  local p = 0xE66D * x0 + 0xB
  local n0 = p % 65536
  p = (p - n0) / 65536 + 0xE66D * x1 + 0xDEEC * x0
  local n1 = p % 65536
  p = (p - n1) / 65536 + 0xE66D * x2 + 0xDEEC * x1 + 0x5 * x0
  x0, x1, x2 = n0, n1, p % 65536
  return x2 * 32768 + floor(x1 / 2)
end

local function checkint(count, n, value, fname)  -- luaL_checkint: a number (or numeric text), truncated
  local number = tonumber(value)
  local kind = type(value)
  if number == nil or (kind ~= "number" and kind ~= "string") then
    error(argerror(n, fname, "number", got(count, n, value)), 3)
  end
  if number >= 0 then number = floor(number) else number = -floor(-number) end
  return (number + 2147483648) % 4294967296 - 2147483648
end

local INT32_MAX = 2147483647

local function random(...)
  local r = (lrand48() % INT32_MAX) / INT32_MAX
  local count = select("#", ...)
  if count == 0 then return r end
  local first, second = ...
  if count == 1 then
    local u = checkint(count, 1, first, "random")
    if u < 1 then error("bad argument #1 to 'random' (interval is empty)", 2) end
    return floor(r * u) + 1
  elseif count == 2 then
    local l, u = checkint(count, 1, first, "random"), checkint(count, 2, second, "random")
    if l > u then error("bad argument #2 to 'random' (interval is empty)", 2) end
    return floor(r * (u - l + 1)) + l
  end
  error("wrong number of arguments", 2)
end

local function randomseed(...)
  local seed = checkint(select("#", ...), 1, (...), "randomseed") % 4294967296
  x0, x1, x2 = 0x330E, seed % 65536, floor(seed / 65536)
end

-- The table functions that write, refused on a read-only table as Redis' Lua refuses them.
local table_lib = copy(table)
function table_lib.insert(...)
  if behind[(...)] ~= nil then error(READONLY, 0) end
  return insert(...)
end
function table_lib.remove(...)
  if behind[(...)] ~= nil then error(READONLY, 0) end
  return remove(...)
end
function table_lib.sort(...)
  if behind[(...)] ~= nil then error(READONLY, 0) end
  return sort(...)
end

local math_lib = copy(math)
math_lib.random, math_lib.randomseed = random, randomseed

local coroutine_lib = copy(coroutine)  -- (with create and wrap below: each coroutine gets the time limit's hook)

-- The time limit: a count hook looks at the clock every `hook_instructions` instructions. Once the
-- script is past its limit every instruction raises (so no pcall keeps it running), but in the
-- sandbox's own functions that end a script (`exempt`).
local limit = 5
local started = nil  -- CPU time the running script started at (nil: none runs)
local killed = false
local exempt = {}

local STOPPED = bridge.stopped

local function hook()
  if not killed and (started == nil or clock() - started <= limit) then return end
  local info = getinfo(2, "f")
  if info ~= nil and exempt[info.func] then return end
  killed = true
  sethook(hook, "", 1)
  error(STOPPED, 0)
end

-- debug.sethook's hook is per coroutine, and a new one does not inherit a Lua hook: give it ours.
local create, resume = coroutine.create, coroutine.resume

function coroutine_lib.create(...)
  local f = ...
  if type(f) ~= "function" then error(argerror(1, "create", "Lua function", got(select("#", ...), 1, f)), 2) end
  local co = create(f)
  if killed then sethook(co, hook, "", 1) else sethook(co, hook, "", hook_instructions) end
  return co
end

local function wrapped(ok, ...)
  if ok then return ... end
  local err = ...
  if type(err) == "string" then error(err, 3) end  -- at the caller's line (level 2: the tail-called wrapper)
  error(err, 0)
end

function coroutine_lib.wrap(...)
  local f = ...
  if type(f) ~= "function" then error(argerror(1, "wrap", "Lua function", got(select("#", ...), 1, f)), 2) end
  local co = coroutine_lib.create(f)
  return function(...) return wrapped(resume(co, ...)) end
end

local control = {}

function control.arm(seconds)
  limit, started, killed = seconds, clock(), false
  sethook(hook, "", hook_instructions)
end

function control.kill()  -- the time ran out in Python (a library's long work): stop the script
  killed = true
  sethook(hook, "", 1)
end

function control.disarm()
  local stopped = killed
  started = nil
  killed = false
  sethook(hook, "", hook_instructions)
  collectgarbage("restart")  -- whatever the script told the collector
  collectgarbage("setpause", 200)
  collectgarbage("setstepmul", 200)
  return stopped
end

-- Redis' error handler: the error as a table {err=, source=, line=}, placed at the script's line.
local OWN = "=sandbox"

local function script_frame(level)  -- the nearest frame that is the script's: not C, not this chunk's
  while true do
    local info = getinfo(level, "Sl")
    if info == nil or (info.what ~= "C" and info.what ~= "tail" and info.source ~= OWN) then return info end
    level = level + 1
  end
end

local function handler(err)
  local info = script_frame(3)
  local message
  if type(err) == "table" and type(err.err) == "string" then
    message = err.err
  else
    local rest = type(err) == "string" and match(err, "^sandbox:%d+: (.*)$")
    if rest then
      -- raised by a C function through one of the functions above: at the script's line, as in Redis
      -- (unless the script tail-called that function, which leaves no line to name)
      err = rest
      if info ~= nil then err = info.short_src .. ":" .. info.currentline .. ": " .. rest end
    end
    message = "ERR " .. tostring(err)
  end
  if info == nil then return {err = message} end
  return {err = message, source = info.source, line = info.currentline}
end

local globals = {}
local function missing(_, name)
  error("Script attempted to access nonexistent global variable '" .. tostring(name) .. "'", 2)
end
setmetatable(globals, {__index = missing})
local G = readonly(globals, readonly({__index = missing}))
chunk_env = G

function control.run(chunk, keys, argv)
  rawset(globals, "KEYS", keys)
  rawset(globals, "ARGV", argv)
  local ok, result = xpcall(chunk, handler)
  rawset(globals, "KEYS", nil)
  rawset(globals, "ARGV", nil)
  return ok, result
end

function control.compile(text, name)
  return compile(text, name)
end

-- A table the functions engine made read-only: guarded here too, showing what it holds.
function control.adopt(view, meta)
  local index = rawmetatable(view).__index
  if type(index) == "function" then  -- a strict view: its names are in the upvalue `globals`
    local i = 1
    while true do
      local name, value = getupvalue(index, i)
      if name == nil then index = {} break end
      if name == "globals" then index = value break end
      i = i + 1
    end
  end
  behind[view], shown[view] = index, meta
end

function control.use_environment(env)  -- the functions engine's: for chunks its functions load
  chunk_env = env
  control.adopt(env, readonly({__index = missing}))
end

exempt[control.disarm], exempt[control.kill], exempt[control.run], exempt[handler], exempt[script_frame] =
  true, true, true, true, true

function control.exempt(f)  -- one of the functions engine's, which must finish even for a stopped script
  exempt[f] = true
end

-- Python's side (each call answers ok, value…): an error of the redis library is Redis' error table,
-- one of the other libraries' a message at the caller's line.
local function raise(ok, value)
  if ok then return value end
  error({err = value}, 0)
end

local function results(ok, ...)
  if ok then return ... end
  error((...), 3)  -- level 2 is the library function, which tail-called this one
end

local function library(functions, values)
  local result = {}
  for name, f in next, functions do result[name] = function(...) return results(f(...)) end end
  for name, value in next, values do result[name] = value end
  return result
end

local call, log, setresp, sha1hex, acl_check = bridge.call, bridge.log, bridge.setresp, bridge.sha1hex,
  bridge.acl_check
local pcall_command, error_text = bridge.pcall, bridge.error_text

local function one_string(...)
  return select("#", ...) == 1 and type((...)) == "string"
end

local redis = {
  call = function(...) return raise(call(...)) end,
  pcall = function(...) return pcall_command(...) end,
  log = function(...) return raise(log(...)) end,
  setresp = function(...) return raise(setresp(...)) end,
  sha1hex = function(...) return raise(sha1hex(...)) end,
  acl_check_cmd = function(...) return raise(acl_check(...)) end,
  error_reply = function(...)
    if not one_string(...) then return {err = "ERR wrong number or type of arguments"} end
    return {err = error_text((...))}
  end,
  status_reply = function(...)
    if not one_string(...) then return {err = "ERR wrong number or type of arguments"} end
    return {ok = (...)}
  end,
  breakpoint = function() return false end,  -- no debugging session (SCRIPT DEBUG) here
  debug = function() end,
  replicate_commands = function() return true end,  -- Redis 7 always replicates effects
  set_repl = function(...)
    if select("#", ...) ~= 1 then error({err = "ERR redis.set_repl() requires two arguments."}, 0) end
    local flags = tonumber((...))
    if flags == nil or flags < 0 or flags > 3 then
      error({err = "ERR Invalid replication flags. Use REPL_AOF, REPL_REPLICA, REPL_ALL or REPL_NONE."}, 0)
    end
  end,
  REDIS_VERSION = bridge.version, REDIS_VERSION_NUM = bridge.version_num,
  REPL_NONE = 0, REPL_AOF = 1, REPL_SLAVE = 2, REPL_REPLICA = 2, REPL_ALL = 3,
  LOG_DEBUG = 0, LOG_VERBOSE = 1, LOG_NOTICE = 2, LOG_WARNING = 3,
}

-- The script's globals: Redis' list, each library a read-only view (the string metatable too).
local libs = {
  string = readonly(copy(string)), math = readonly(math_lib), table = readonly(table_lib),
  coroutine = readonly(coroutine_lib), redis = readonly(redis),
}
for name, functions in next, python_libraries.functions do
  libs[name] = readonly(library(functions, python_libraries.values[name] or {}))
end
rawset(behind[libs.cjson], "new", function() return libs.cjson end)
rawset(string_meta, "__index", libs.string)
string_meta_view = readonly(string_meta)

for _, name in next, bridge.names do
  local value = base[name] or libs[name] or real_globals[name]
  if name == "_G" then value = G elseif name == "__redis__err__handler" then value = handler end
  globals[name] = value
  if name ~= "_G" then real_globals[name] = value end  -- for the functions engine, which copies them
end

sethook(hook, "", hook_instructions)
return control
"""


class TimeUp(Exception):
    """Python work for a script (a library's, a reply's conversion) ran past the time limit."""


def _failure(error: BaseException) -> tuple[bool, bytes]:
    """What a Python call from Lua answers for an exception (a fault of ours costs the script only).
    Text goes to Lua as bytes: a str would arrive as a Python object."""
    if isinstance(error, SimpleError):
        return False, error.value.encode()
    if isinstance(error, TimeUp):
        return False, STOPPED.encode()
    if isinstance(error, lua.LuaMemoryError):
        return False, b"not enough memory"
    log.error("a Lua script's call into the broker failed", exc_info=error)
    return False, INTERNAL.encode()


def _answering(function: Callable[..., Any]) -> Callable[..., tuple]:
    """A Python function Lua calls, answering (True, value) or (False, Redis' error text)."""

    def call(*args: Any) -> tuple:
        try:
            return True, function(*args)
        except Exception as error:
            return _failure(error)

    return call


def _guarded(function: Callable[..., tuple]) -> Callable[..., tuple]:
    """A library function (already answering (ok, …)), made safe from exceptions."""

    def call(*args: Any) -> tuple:
        try:
            result = function(*args)
        except Exception as error:
            return _failure(error)
        if not result[0] and isinstance(result[1], str):
            return False, result[1].encode()
        return result

    return call


def _no_attributes(obj: Any, name: Any, is_setting: bool) -> Any:
    raise AttributeError("Python objects are not reachable from a script")


def error_text(message: bytes) -> bytes:
    """redis.error_reply's message as Redis keeps it: "CODE rest" (or "-CODE rest") stays, a word
    alone gets "ERR" before it; newlines around it go."""
    body = message[1:] if message.startswith(b"-") else message
    code, space, rest = body.partition(b" ")
    if not space:
        return b"ERR " + body.strip(b"\r\n")
    return code + b" " + rest.strip(b"\r\n")


class Interpreter:
    """One sandboxed Lua interpreter (a lupa runtime) and the controls its sandbox returns."""

    def __init__(self, server: Any, names: tuple[str, ...]):
        self.runtime = lua.LuaRuntime(encoding=None, unpack_returned_tuples=True, register_eval=False,
                                      register_builtins=False, attribute_filter=_no_attributes,
                                      max_memory=MEMORY_LIMIT)
        self.time_limit = float(getattr(server, "lua_time_limit", DEFAULT_TIME_LIMIT))
        self.caller: Any = None  # the client whose script runs
        self.read_only = False
        self.started: float | None = None  # CPU time the running script started at
        self.ticks = 0
        self._compiled: dict[bytes, Any] = {}
        major, minor, patch = (tuple(server.version) + (0, 0, 0))[:3]
        table = self.runtime.table_from
        functions, values = libraries(self.runtime, _lua_cjson_null, self.check_time)
        python_libraries = table({
            b"functions": table({name.encode(): table({member.encode(): _guarded(function)
                                                        for member, function in members.items()})
                                 for name, members in functions.items()}),
            b"values": table({name.encode(): table({member.encode(): value for member, value in members.items()})
                              for name, members in values.items()}),
        })
        bridge = table({
            b"call": _answering(self._call), b"pcall": self._pcall, b"log": _answering(self._log),
            b"setresp": _answering(self._setresp), b"sha1hex": _answering(_sha1hex),
            b"acl_check": _answering(self._acl_check), b"error_text": error_text, b"stopped": STOPPED.encode(),
            b"version": f"{major}.{minor}.{patch}".encode(), b"version_num": (major << 16) | (minor << 8) | patch,
            b"names": table([name.encode() for name in names]),
        })
        sandbox = self.runtime.compile(SANDBOX_LUA, name=b"=sandbox")
        self.control = sandbox(bridge, python_libraries, HOOK_INSTRUCTIONS)
        self._call_answering = _answering(self._call)

    # -- what Lua calls -----------------------------------------------------------------------------

    def _call(self, *args: Any) -> Any:
        return self.caller._function_redis_call(self.runtime, self.read_only, *args)

    def _pcall(self, *args: Any) -> Any:
        ok, value = self._call_answering(*args)
        return value if ok else self.runtime.table_from({b"err": value})

    def _log(self, *args: Any) -> None:
        if len(args) < 2:
            raise SimpleError(msgs.REQUIRES_MORE_ARGS_MSG.format("redis.log()", "two"))
        level = args[0]
        if isinstance(level, bool) or not isinstance(level, (int, float)) or level not in REDIS_LOG_LEVELS_TO_LOGGING:
            raise SimpleError(msgs.LOG_INVALID_DEBUG_LEVEL_MSG)
        text = " ".join(arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
                        for arg in args[1:] if not isinstance(arg, bool))
        logging.getLogger("fakeredis").log(REDIS_LOG_LEVELS_TO_LOGGING[int(level)], text)

    def _setresp(self, *args: Any) -> None:
        self.caller._lua_setresp(self.runtime, set(self.runtime.globals().keys()), *args)

    def _acl_check(self, *args: Any) -> bool:
        if not args:
            raise SimpleError(msgs.LUA_CALL_NO_ARGS_MSG)
        name = args[0].decode("utf-8", "replace").lower() if isinstance(args[0], bytes) else str(args[0])
        try:
            func, _ = self.caller._name_to_func(name)
        except SimpleError:
            func = None
        if func is None:
            raise SimpleError("ERR Invalid command passed to redis.acl_check_cmd()")
        return True  # the broker's one user may run every command

    def check_time(self) -> None:
        """For Python work done for a script: past the limit, stop the script."""
        if self.started is not None and time.process_time() - self.started > self.time_limit:
            self.control.kill()
            raise TimeUp

    def tick(self) -> None:
        self.ticks += 1
        if not self.ticks & 1023:
            self.check_time()

    # -- what the broker calls ----------------------------------------------------------------------

    def compile(self, script: bytes, sha1: bytes) -> Any:
        """The script's chunk (kept by SHA1); a syntax error is Redis' error."""
        chunk = self._compiled.get(sha1)
        if chunk is None:
            try:
                chunk, error = self.control.compile(script, b"@user_script")
            except lua.LuaMemoryError:
                self.runtime.gccollect()
                raise SimpleError(MEMORY_ERROR.format(MEMORY_LIMIT // 2**20)) from None
            if chunk is None:
                raise SimpleError(f"ERR Error compiling script (new function): {_text(error)}")
            if len(self._compiled) >= COMPILED_KEPT:
                del self._compiled[next(iter(self._compiled))]
            self._compiled[sha1] = chunk
        return chunk

    def run(self, chunk: Any, keys: Any, argv: Any) -> tuple[bool, Any]:
        """Run a compiled script (inside `bounded`): (True, its result) or (False, its error)."""
        table = self.runtime.table_from
        return self.control.run(chunk, table(keys), table(argv))

    def failure(self, result: Any, name: bytes) -> SimpleError:
        """The error reply for a script that failed with `result` (the error handler's table, or
        Lua's own message where it calls no handler: out of memory)."""
        if lua.lua_type(result) == "table":
            return SimpleError(located(_text(result[b"err"]), result, name))
        if result == b"not enough memory":
            return self.memory_error()
        return SimpleError(f"ERR Error running script {name.decode()}, {_text(result)[:100]}")

    def memory_error(self) -> SimpleError:
        self.runtime.gccollect()
        return SimpleError(MEMORY_ERROR.format(MEMORY_LIMIT // 2**20))

    def killed(self, result: Any = None, name: bytes = b"") -> SimpleError:
        return SimpleError(located(KILLED.format(self.time_limit), result, name))

    def bounded(self, caller: Any, read_only: bool = False) -> "Bounded":
        return Bounded(self, caller, read_only)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def located(message: str, result: Any, name: bytes) -> str:
    """Redis' "<message> script: <name>, on <source>:<line>." where the handler found the line."""
    if lua.lua_type(result) != "table":
        return message
    source, line = result[b"source"], result[b"line"]
    if source is None or line is None:
        return message
    return f"{message} script: {name.decode()}, on {_text(source)}:{int(line)}."


class Bounded:
    """While a script or function runs: whose it is, the time limit armed, and after it whether the
    limit stopped it (`killed`); memory collected after a failure that may have left garbage."""

    def __init__(self, interpreter: Interpreter, caller: Any, read_only: bool):
        self.interpreter, self.caller, self.read_only = interpreter, caller, read_only
        self.killed = False

    def __enter__(self) -> "Bounded":
        interpreter = self.interpreter
        self.outer = (interpreter.caller, interpreter.read_only, interpreter.started)
        interpreter.caller, interpreter.read_only = self.caller, self.read_only
        interpreter.started = time.process_time()
        interpreter.control.arm(interpreter.time_limit)
        if self.caller is not None:
            self.caller._lua_bounded = interpreter
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        interpreter = self.interpreter
        interpreter.caller, interpreter.read_only, interpreter.started = self.outer
        if self.caller is not None:
            self.caller._lua_bounded = None
        try:
            self.killed = bool(interpreter.control.disarm())
        except lua.LuaError:  # no memory left even for that: collect, and once more
            interpreter.runtime.gccollect()
            self.killed = bool(interpreter.control.disarm())
        if self.killed or kind is not None:
            interpreter.runtime.gccollect()


# -- the functions engine, in a sandboxed interpreter ---------------------------------------------

class SandboxedFunctions(FunctionsEngine):
    """fakeredis' Redis Functions (its engine and its Lua) in an interpreter of ours: the sandbox's
    globals, read-only tables, text-only chunks and bounds."""

    def __init__(self, server: Any) -> None:  # FunctionsEngine.__init__, over that interpreter
        self.interpreter = Interpreter(server, FUNCTION_GLOBALS)
        runtime = self.interpreter.runtime
        self._lua_module = lua
        self._server_type = server.server_type
        self._version = server.version
        self.libraries = {}
        self.runtime = runtime
        self.expected_globals: set[Any] = set()
        self._caller = None
        self._read_only = False
        major, minor, patch = (tuple(server.version) + (0, 0, 0))[:3]
        api = runtime.table_from({
            b"call": self._located(self._redis_call), b"pcall": self._redis_pcall,
            b"setresp": self._located(self._setresp), b"log": self._located(self.interpreter._log),
            b"sha1hex": self._located(_sha1hex), b"version": f"{major}.{minor}.{patch}".encode(),
            b"version_num": (major << 16) | (minor << 8) | patch,
            b"cjson": runtime.table(),  # (replaced by the sandbox's cjson, one of FUNCTION_GLOBALS)
        })
        allowed = runtime.table_from([name.encode() for name in FUNCTION_GLOBALS])
        self._lua = runtime.execute(_ENGINE_SOURCE, b"redis", allowed, api, True)
        self.expected_globals.update(runtime.globals().keys())
        redis_view, environment = self._lua.compile(b"return redis, _G")[0]()
        control = self.interpreter.control
        control.adopt(redis_view, None)
        control.use_environment(environment)
        for name in (b"begin_load", b"end_load", b"current_line"):  # they run after a library's code fails
            control.exempt(self._lua[name])

    # lupa's LuaMemoryError carries no message, so the engine's error for it is "ERR " and nothing more
    # (or that after "Error registering functions: "): said here as the scripts' memory error is.

    def call(self, *args: Any) -> Any:
        try:
            return super().call(*args)
        except SimpleError as error:
            if error.value.endswith("ERR "):
                raise self.interpreter.memory_error() from None
            raise

    def _create_library(self, *args: Any) -> Any:
        try:
            return super()._create_library(*args)
        except SimpleError as error:
            if error.value.endswith("ERR "):
                raise self.interpreter.memory_error() from None
            raise


# -- the commands, for the broker's socket --------------------------------------------------------

def _interpreter(server: Any) -> Interpreter:
    interpreter = getattr(server, "_lua_sandbox", None)
    if interpreter is None:
        interpreter = server._lua_sandbox = Interpreter(server, SCRIPT_GLOBALS)
    return interpreter


def set_time_limit(server: Any, seconds: float) -> None:
    """The CPU seconds a script may run on `server` (a FakeServer) before it is stopped; read when
    its interpreters are made (at the first script)."""
    server.lua_time_limit = seconds


class SandboxedScripting:
    """fakeredis' scripting commands, run in the sandbox: mixed into the broker's socket, ahead of
    fakeredis' FakeSocket (whose EVALSHA calls `eval` here)."""

    _lua_bounded: Interpreter | None = None

    def eval(self, script: bytes, numkeys: int, *keys_and_args: bytes) -> Any:
        return self._run_script(script, numkeys, keys_and_args, read_only=False)

    @command(name="EVAL_RO", fixed=(bytes, Int), repeat=(bytes,), flags=msgs.FLAG_NO_SCRIPT)
    def eval_ro(self, script: bytes, numkeys: int, *keys_and_args: bytes) -> Any:
        return self._run_script(script, numkeys, keys_and_args, read_only=True)

    @command(name="EVALSHA_RO", fixed=(bytes, Int), repeat=(bytes,), flags=msgs.FLAG_NO_SCRIPT)
    def evalsha_ro(self, sha1: bytes, numkeys: int, *keys_and_args: bytes) -> Any:
        script = self._server.script_cache.get(sha1)
        if script is None:
            raise SimpleError(msgs.NO_MATCHING_SCRIPT_MSG)
        return self._run_script(script, numkeys, keys_and_args, read_only=True)

    def script_load(self, *args: bytes) -> bytes:
        if len(args) != 1:
            raise SimpleError(msgs.BAD_SUBCOMMAND_MSG.format("SCRIPT"))
        sha1 = hashlib.sha1(args[0]).hexdigest().encode()
        _interpreter(self._server).compile(args[0], sha1)  # as Redis: a script that does not compile is refused
        self._server.script_cache[sha1] = args[0]
        return sha1

    def _run_script(self, script: bytes, numkeys: int, keys_and_args: tuple[bytes, ...], read_only: bool) -> Any:
        if numkeys > len(keys_and_args):
            raise SimpleError(msgs.TOO_MANY_KEYS_MSG)
        if numkeys < 0:
            raise SimpleError(msgs.NEGATIVE_KEYS_MSG)
        sha1 = hashlib.sha1(script).hexdigest().encode()
        interpreter = _interpreter(self._server)
        chunk = interpreter.compile(script, sha1)
        self._server.script_cache[sha1] = script
        # Every script starts at RESP2 and sees none of the caller's HIMPORT fieldsets (as fakeredis' eval).
        self._script_resp = 2
        caller_fieldsets, self._fieldsets = self._fieldsets, {}
        bounded = interpreter.bounded(self, read_only)
        ok, result = False, None
        try:
            with bounded:
                ok, result = interpreter.run(chunk, keys_and_args[:numkeys], keys_and_args[numkeys:])
                self._script_resp = None  # the reply is shaped for the client's own protocol
                if ok:
                    return self._convert_lua_result(result, nested=False)
        except TimeUp:
            pass
        except lua.LuaMemoryError:
            raise interpreter.memory_error() from None
        except RecursionError:
            raise SimpleError(STACK_LIMIT) from None
        finally:
            self._script_resp = None
            self._fieldsets = caller_fieldsets
            if bounded.killed:
                raise interpreter.killed(result, sha1)
        raise interpreter.failure(result, sha1)

    def _convert_lua_result(self, result: Any, nested: bool = True) -> Any:
        if self._lua_bounded is not None:
            self._lua_bounded.tick()
        if isinstance(result, float) and not (-(2**63) <= result < 2**63):
            return -(2**63)  # what redis-server's cast to long long gives (NaN too)
        converted = super()._convert_lua_result(result, nested)  # type: ignore[misc]
        if isinstance(converted, SimpleString) and (b"\r" in converted.value or b"\n" in converted.value):
            # a status reply holds one line: Redis maps CR and LF to spaces
            return SimpleString(converted.value.replace(b"\r", b" ").replace(b"\n", b" "))
        return converted

    def _functions(self) -> FunctionsEngine:
        server = self._server
        if getattr(server, "_lua_functions", None) is None:
            server._lua_functions = SandboxedFunctions(server)
        return server._lua_functions

    def _fcall(self, *args: Any, **kwargs: Any) -> Any:
        return self._functions_bounded(super()._fcall, *args, **kwargs)  # type: ignore[misc]

    def function_load(self, *args: bytes) -> bytes:
        return self._functions_bounded(super().function_load, *args)  # type: ignore[misc]

    def function_restore(self, *args: bytes) -> Any:
        return self._functions_bounded(super().function_restore, *args)  # type: ignore[misc]

    def _functions_bounded(self, run: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        interpreter = self._functions().interpreter  # type: ignore[attr-defined]
        bounded = interpreter.bounded(self)
        try:
            with bounded:
                return run(*args, **kwargs)
        except (SimpleError, TimeUp) as error:
            if not bounded.killed:
                raise
            text = error.value if isinstance(error, SimpleError) else ""
            where = text[text.index(" script: "):] if " script: " in text else ""
            raise SimpleError(KILLED.format(interpreter.time_limit) + where) from None
        except lua.LuaMemoryError:
            raise interpreter.memory_error() from None
        except RecursionError:
            raise SimpleError(STACK_LIMIT) from None
