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

from runner.broker.lua_libraries import libraries, type_name
from runner.settings.table import BY_NAME

log = logging.getLogger("dify_local.broker")

MEMORY_LIMIT = 256 * 1024 * 1024  # bytes each interpreter may hold (scripts; functions)
DEFAULT_TIME_LIMIT = BY_NAME["DIFY_LOCAL_BROKER_LUA_TIME_LIMIT"].default
HOOK_INSTRUCTIONS = 100_000  # between two looks at the clock (as redis-server's own hook)
COMPILED_KEPT = 1000  # compiled scripts kept by SHA1; beyond (or past COMPILED_BYTES of source), the oldest go
COMPILED_BYTES = 16 * 1024 * 1024  # (they live in the interpreter's memory, which scripts need)
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
local concat, insert = table.concat, table.insert
local real_globals = _G
-- Python functions become C functions (lupa's python.as_function): a script that tail-calls one
-- keeps its own frame, so an error names the script's line, as with Redis' C functions. An error
-- such a function raises arrives as a Python exception: `explain` turns it into what Redis raises.
local as_function, unwrap = python.as_function, bridge.unwrap
local ours = {}  -- those C functions

local function C(f)
  local c = as_function(f)
  ours[c] = true
  return c
end

local function position_of(level)  -- luaL_where(L, 1) for one of those C functions, at `level` here
  local c = getinfo(level + 1, "f")
  local info = c ~= nil and ours[c.func] and getinfo(level + 2, "Sl")
  if info and info.currentline > 0 then return info.short_src .. ":" .. info.currentline .. ": " end
  return ""  -- (called in a coroutine, Python's call runs on the main thread: then no line is known)
end

local function explain(err)
  if type(err) == "userdata" then return unwrap(err) end
  return err
end

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

local function metatable_of(v)
  if behind[v] ~= nil then return shown[v] end
  local kind = type(v)
  if kind == "string" then return string_meta_view end
  if kind == "userdata" then return nil end  -- cjson.null: Redis' is a light userdata, without one
  return getmetatable(v)
end

-- Redis' pcall: an error table's message (what redis.call raises) comes back as the error.
local function caught(ok, ...)
  if ok then return true, ... end
  local err = explain((...))
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

local killed  -- (the time limit's, below)

function base.xpcall(...)
  local f, h = ...
  if select("#", ...) < 2 then error("bad argument #2 to 'xpcall' (value expected)", 2) end
  return xpcall(f, function(err)
    -- The stop is raised from the count hook, and Lua runs a handler for an error raised there with
    -- hooks off: a script's handler would then run unbounded. Once stopped, it is not run at all.
    if killed then return err end
    return h(explain(err))
  end)
end

-- Text only: Redis' Lua parses every chunk, so one starting with "\27" (bytecode) is a syntax error.
local chunk_env  -- where the chunks a script loads find their globals

local function compile(text, name)
  if byte(text, 1) == 27 then text = " " .. text end  -- read as text: "unexpected symbol near 'char(27)'"
  local chunk, err = loadstring(text, name)
  if chunk ~= nil then setfenv(chunk, chunk_env) end
  return chunk, err
end

-- (loadstring and load: behind a Python front that checks their arguments, see `fronted` below)
local function loadstring_checked(text, name)
  text = tostring(text)
  if name == nil then name = text end
  return compile(text, tostring(name))
end

local handler  -- (below) the reader's errors go through it, as in Redis, whose lua_load keeps the
               -- running error handler: a failing reader gives load's caller an error table

local function load_checked(reader, name)
  if name == nil then name = "=(load)" end
  local pieces, n = {}, 0
  while true do
    local ok, piece = xpcall(reader, handler)
    if not ok then return nil, piece end
    if piece == nil or piece == "" then break end
    local kind = type(piece)
    if kind ~= "string" and kind ~= "number" then
      return nil, handler(position_of(2) .. "reader function must return a string")
    end
    n = n + 1
    pieces[n] = piece
  end
  return compile(concat(pieces), tostring(name))
end

-- The table functions that write, refused on a read-only table as Redis' Lua refuses them.
local table_lib = copy(table)
function table_lib.insert(...)
  if behind[(...)] ~= nil then error(READONLY, 0) end
  return insert(...)
end
-- (remove and sort write nothing to a view, whose length is 0: Redis lets them be, and so do we)

local math_lib = copy(math)  -- (with redis-server's random and randomseed: lua_libraries.py)

-- Lua 5.1's pattern matcher recurses once per quantified item or capture, without a bound: a long
-- enough pattern overflows the C stack and kills the process (redis-server 7.0 too, "a?" 200,000
-- times). Lua 5.2 refuses past 200 levels ("pattern too complex"): so do we, counting every
-- character that can make one (a pattern of 200 characters or fewer is never refused).
local string_lib = copy(string)
local find, gmatch, gsub = string.find, string.gmatch, string.gsub
local MAX_PATTERN_DEPTH = 200

local function too_complex(pattern)
  if type(pattern) ~= "string" or #pattern <= MAX_PATTERN_DEPTH then return false end
  local _, levels = gsub(pattern, "[%(%)%*%+%-%?]", "")
  return levels > MAX_PATTERN_DEPTH
end

function string_lib.find(...)
  local _, pattern, _, plain = ...
  if not plain and too_complex(pattern) then error("pattern too complex", 2) end
  return find(...)
end
function string_lib.match(...)
  local _, pattern = ...
  if too_complex(pattern) then error("pattern too complex", 2) end
  return match(...)
end
function string_lib.gmatch(...)
  local _, pattern = ...
  if too_complex(pattern) then error("pattern too complex", 2) end
  return gmatch(...)
end
function string_lib.gsub(...)
  local _, pattern = ...
  if too_complex(pattern) then error("pattern too complex", 2) end
  return gsub(...)
end

local coroutine_lib = copy(coroutine)  -- (with create and wrap below: each coroutine gets the time limit's hook)

-- The time limit: a count hook looks at the clock every `hook_instructions` instructions. Once the
-- script is past its limit every instruction raises (so no pcall keeps it running), but in the
-- sandbox's own functions that end a script (`exempt`).
local limit = 5
local started = nil  -- CPU time the running script started at (nil: none runs)
killed = false
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

-- debug.sethook's hook is per coroutine, and a new one does not get a Lua hook from its creator:
-- each coroutine's function starts by setting ours (coroutine.create and wrap stay C's own).
local create, wrap, resume = coroutine.create, coroutine.wrap, coroutine.resume

local function hooked(name, make)
  return function(...)
    local f = ...
    if type(f) ~= "function" or getinfo(f, "S").what == "C" then
      error(format("bad argument #1 to '%s' (Lua function expected)", name), 2)
    end
    return make(function(...)
      if killed then sethook(hook, "", 1) else sethook(hook, "", hook_instructions) end
      return f(...)
    end)
  end
end
coroutine_lib.create, coroutine_lib.wrap = hooked("create", create), hooked("wrap", wrap)

local function resumed(ok, ...)
  if ok then return true, ... end
  return false, explain((...))
end

function coroutine_lib.resume(...)
  return resumed(resume(...))
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

function handler(err)
  local info = script_frame(3)
  err = explain(err)
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
local missing = C(bridge.missing)  -- raises at the reader's line, as Redis' C function does
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

function control.where()  -- for Python: the position of the caller of the C function it runs in
  return position_of(2)
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

for _, f in next, {control.disarm, control.kill, control.run, control.where, handler, script_frame} do
  exempt[f] = true
end

function control.exempt(f)  -- one of the functions engine's, which must finish even for a stopped script
  exempt[f] = true
end

-- The redis library: Python's functions, raising Redis' error tables, and these few in Lua.
local error_text = bridge.error_text

local function one_string(...)
  return select("#", ...) == 1 and type((...)) == "string"
end

local redis = {
  call = C(bridge.call), pcall = C(bridge.pcall), log = C(bridge.log), setresp = C(bridge.setresp),
  sha1hex = C(bridge.sha1hex), acl_check_cmd = C(bridge.acl_check), set_repl = C(bridge.set_repl),
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
  REDIS_VERSION = bridge.version, REDIS_VERSION_NUM = bridge.version_num,
  REPL_NONE = 0, REPL_AOF = 1, REPL_SLAVE = 2, REPL_REPLICA = 2, REPL_ALL = 3,
  LOG_DEBUG = 0, LOG_VERBOSE = 1, LOG_NOTICE = 2, LOG_WARNING = 3,
}

-- The script's globals: Redis' list, each library a read-only view (the string metatable too).
local libs = {
  string = readonly(string_lib), math = readonly(math_lib), table = readonly(table_lib),
  coroutine = readonly(coroutine_lib), redis = readonly(redis),
}
for name, functions in next, python_libraries.functions do
  local library = name == "math" and math_lib or {}
  for member, f in next, functions do library[member] = C(f) end
  for member, value in next, python_libraries.values[name] or {} do library[member] = value end
  if name ~= "math" then libs[name] = readonly(library) end
end
rawset(behind[libs.cjson], "new", function() return libs.cjson end)
base.getmetatable = C(bridge.front("getmetatable", metatable_of))
base.loadstring = C(bridge.front("loadstring", loadstring_checked))
base.load = C(bridge.front("load", load_checked))
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


class ScriptError(SimpleError):
    """An error a Python function raises into a script: `lua_value` is what the Lua error carries
    (Redis' error table for the redis library, a message at the caller's line for the others); the
    SimpleError's own text is the reply, should it reach one (a function's uncaught error)."""

    def __init__(self, reply: str, lua_value: Any):
        super().__init__(reply)
        self.lua_value = lua_value


# fakeredis' words where redis-server 7's differ
REDIS_WORDS = {msgs.COMMAND_IN_SCRIPT_MSG: "ERR This Redis command is not allowed from script"}


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


def _lua_type(args: tuple, n: int) -> str:
    if n > len(args):
        return "no value"
    return type_name(args[n - 1])


def _checklstring(args: tuple, n: int, name: str, optional: bool = False) -> str | None:
    kind = _lua_type(args, n)
    if kind in ("string", "number") or (optional and kind in ("nil", "no value")):
        return None
    return f"bad argument #{n} to '{name}' (string expected, got {kind})"


FRONT_CHECKS: dict[str, Callable[[tuple], str | None]] = {
    "getmetatable": lambda args: None if args else "bad argument #1 to 'getmetatable' (value expected)",
    "loadstring": lambda args: _checklstring(args, 1, "loadstring") or _checklstring(args, 2, "loadstring", True),
    "load": lambda args: (None if _lua_type(args, 1) == "function"
                          else f"bad argument #1 to 'load' (function expected, got {_lua_type(args, 1)})")
    or _checklstring(args, 2, "load", True),
}


def _lua_text(value: Any) -> str:
    """A Lua value as lua_tostring gives it, for a message."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return ("%.14g" % value) if isinstance(value, float) else str(value)


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
        self._compiled: dict[bytes, tuple[Any, int]] = {}  # SHA1: (chunk, length of its source)
        self._compiled_bytes = 0
        major, minor, patch = (tuple(server.version) + (0, 0, 0))[:3]
        table = self.runtime.table_from
        functions, values = libraries(self.runtime, _lua_cjson_null, self.check_time)
        python_libraries = table({
            b"functions": table({name.encode(): table({member.encode(): self._library_function(function)
                                                        for member, function in members.items()})
                                 for name, members in functions.items()}),
            b"values": table({name.encode(): table({member.encode(): value for member, value in members.items()})
                              for name, members in values.items()}),
        })
        redis_function = self._redis_function
        bridge = table({
            b"call": redis_function(self._call), b"pcall": self._pcall, b"log": redis_function(self._log),
            b"setresp": redis_function(self._setresp), b"sha1hex": redis_function(_sha1hex),
            b"acl_check": redis_function(self._acl_check), b"set_repl": redis_function(self._set_repl),
            b"missing": self._missing, b"unwrap": self._unwrap, b"error_text": error_text,
            b"front": self._front,
            b"stopped": STOPPED.encode(), b"names": table([name.encode() for name in names]),
            b"version": f"{major}.{minor}.{patch}".encode(), b"version_num": (major << 16) | (minor << 8) | patch,
        })
        sandbox = self.runtime.compile(SANDBOX_LUA, name=b"=sandbox")
        self.control = control = sandbox(bridge, python_libraries, HOOK_INSTRUCTIONS)
        # The controls, fetched now: read from a table while a coroutine runs, lupa answers a tuple.
        self.where, self.kill, self.arm, self.disarm = control.where, control.kill, control.arm, control.disarm
        self._run, self._compile = control.run, control.compile

    # -- errors raised into Lua ---------------------------------------------------------------------

    def redis_error(self, text: str) -> ScriptError:
        """An error of the redis library: Redis raises it as a table {err = text}."""
        return ScriptError(text, self.runtime.table_from({b"err": text.encode()}))

    def plain_error(self, text: str | bytes) -> ScriptError:
        """A library's error (luaL_error): the message, after the caller's line."""
        message = self.where() + (text.encode() if isinstance(text, str) else text)
        return ScriptError("ERR " + message.decode("utf-8", "replace"), message)

    def _fault(self, error: BaseException) -> str:
        """The words for an exception a Python function did not mean: a fault of ours costs the
        script, never the broker."""
        if isinstance(error, TimeUp):
            return STOPPED
        if isinstance(error, lua.LuaMemoryError):
            return "not enough memory"
        log.error("a Lua script's call into the broker failed", exc_info=error)
        return INTERNAL

    def _redis_function(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            try:
                return function(*args)
            except ScriptError:
                raise
            except SimpleError as error:
                raise self.redis_error(REDIS_WORDS.get(error.value, error.value)) from None
            except Exception as error:
                raise self.redis_error(self._fault(error)) from None
        return call

    def _library_function(self, function: Callable[..., tuple]) -> Callable[..., Any]:
        """A library function answering (True, values…) or (False, message), for Lua: the values, or
        the message raised at the caller's line."""
        def call(*args: Any) -> Any:
            try:
                result = function(*args)
            except ScriptError:
                raise
            except Exception as error:
                raise self.plain_error(self._fault(error)) from None
            if result[0]:
                return result[1:]
            raise self.plain_error(result[1])
        return call

    def _unwrap(self, value: Any) -> Any:
        """What a Lua error from Python carries: a ScriptError's value, another SimpleError's text
        (the functions engine's), anything else as it is."""
        if isinstance(value, ScriptError):
            return value.lua_value
        if isinstance(value, SimpleError):
            return value.value.encode()
        return value

    # -- what Lua calls -----------------------------------------------------------------------------

    def _call(self, *args: Any) -> Any:
        return self.caller._function_redis_call(self.runtime, self.read_only, *args)

    def _pcall(self, *args: Any) -> Any:
        try:
            return self._redis_function(self._call)(*args)
        except ScriptError as error:
            return error.lua_value

    def _log(self, *args: Any) -> tuple:
        if len(args) < 2:
            raise SimpleError(msgs.REQUIRES_MORE_ARGS_MSG.format("redis.log()", "two"))
        level = args[0]
        if isinstance(level, bool) or not isinstance(level, (int, float)) or level not in REDIS_LOG_LEVELS_TO_LOGGING:
            raise SimpleError(msgs.LOG_INVALID_DEBUG_LEVEL_MSG)
        text = " ".join(arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
                        for arg in args[1:] if not isinstance(arg, bool))
        logging.getLogger("fakeredis").log(REDIS_LOG_LEVELS_TO_LOGGING[int(level)], text)
        return ()

    def _setresp(self, *args: Any) -> tuple:
        self.caller._lua_setresp(self.runtime, set(self.runtime.globals().keys()), *args)
        return ()

    def _set_repl(self, *args: Any) -> tuple:
        if len(args) != 1:
            raise SimpleError("ERR redis.set_repl() requires two arguments.")  # (sic, redis-server 7)
        flags = args[0]
        if isinstance(flags, bool) or not isinstance(flags, (int, float)) or flags not in (0, 1, 2, 3):
            raise SimpleError("ERR Invalid replication flags. Use REPL_AOF, REPL_REPLICA, REPL_ALL or REPL_NONE.")
        return ()

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

    def _front(self, name: bytes, lua_function: Any) -> Callable[..., Any]:
        """A C function checking a base function's arguments as Lua's C one does (so its error names
        the caller's line, even for `return f(...)`), then running the sandbox's Lua for it."""
        check = FRONT_CHECKS[name.decode()]

        def front(*args: Any) -> Any:
            problem = check(args)
            if problem:
                raise self.plain_error(problem)
            return lua_function(*args)

        return front

    def _missing(self, table: Any, name: Any) -> None:
        """A read of a global that is not there (Redis' luaProtectedTableError)."""
        if not isinstance(name, (bytes, int, float)) or isinstance(name, bool):
            raise self.plain_error("Second argument to luaProtectedTableError must be a string or number")
        raise self.plain_error(f"Script attempted to access nonexistent global variable '{_lua_text(name)}'")

    def check_time(self) -> None:
        """For Python work done for a script: past the limit, stop the script."""
        if self.started is not None and time.process_time() - self.started > self.time_limit:
            self.kill()
            raise TimeUp

    def tick(self) -> None:
        self.ticks += 1
        if not self.ticks & 1023:
            self.check_time()

    # -- what the broker calls ----------------------------------------------------------------------

    def compile(self, script: bytes, sha1: bytes) -> Any:
        """The script's chunk (kept by SHA1); a syntax error is Redis' error."""
        kept = self._compiled.get(sha1)
        chunk = kept[0] if kept is not None else None
        if chunk is None:
            try:
                chunk, error = self._compile(script, b"@user_script")
            except lua.LuaMemoryError:
                self.runtime.gccollect()
                raise SimpleError(MEMORY_ERROR.format(MEMORY_LIMIT // 2**20)) from None
            if chunk is None:
                raise SimpleError(f"ERR Error compiling script (new function): {_text(error)}")
            while self._compiled and (len(self._compiled) >= COMPILED_KEPT
                                      or self._compiled_bytes + len(script) > COMPILED_BYTES):
                self._compiled_bytes -= self._compiled.pop(next(iter(self._compiled)))[1]
            self._compiled[sha1] = (chunk, len(script))
            self._compiled_bytes += len(script)
        return chunk

    def run(self, chunk: Any, keys: Any, argv: Any) -> tuple[bool, Any]:
        """Run a compiled script (inside `bounded`): (True, its result) or (False, its error)."""
        table = self.runtime.table_from
        return self._run(chunk, table(keys), table(argv))

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
        interpreter.arm(interpreter.time_limit)
        if self.caller is not None:
            self.caller._lua_bounded = interpreter
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        interpreter = self.interpreter
        interpreter.caller, interpreter.read_only, interpreter.started = self.outer
        if self.caller is not None:
            self.caller._lua_bounded = None
        try:
            self.killed = bool(interpreter.disarm())
        except lua.LuaError:  # no memory left even for that: collect, and once more
            interpreter.runtime.gccollect()
            self.killed = bool(interpreter.disarm())
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

    @command(name="SCRIPT KILL", fixed=(), flags=msgs.FLAG_NO_SCRIPT)
    def script_kill(self) -> None:
        # A script runs to its end (or its time limit) before any other command is read.
        raise SimpleError("NOTBUSY No scripts in execution right now.")

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
