"""The libraries redis-server adds to its Lua: `bit` (LuaBitOp), `struct` (Roberto Ierusalimschy's),
`cmsgpack` (lua-cmsgpack 0.4.0) and `cjson` (lua-cjson 2.1.0), as redis-server 7 answers them,
written in Python and called from the sandbox (lua_sandbox.py). lupa's Lua has none of them, and
fakeredis' cjson differs (NaN written as JSON, binary refused, no sparse-array rule).

Each function here takes what Lua passes (numbers as int or float, strings as bytes) and returns a
tuple: (True, value, …) or (False, message); the Lua side raises the message at the script's line,
as the C libraries' luaL_error does. Work that could run long in Python (packing a table that refers
to itself many times over) looks at the script's time limit as it goes (`checkpoint`).
"""

from __future__ import annotations

import json
import math
import re
import struct as _struct
from typing import Any, Callable

import lupa.lua51 as lua

Result = tuple  # (True, value, …) | (False, message)


MAX_RESULTS = 7900  # values one call may return (Lua's stack, as luaL_checkstack refuses beyond)


def type_name(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, bytes):
        return "string"
    if "Coroutine" in type(value).__name__ or "Thread" in type(value).__name__:
        return "thread"  # (lupa's lua_type calls a coroutine a function)
    return lua.lua_type(value) or "userdata"


def argerror(n: int, name: str, message: str) -> Result:
    return False, f"bad argument #{n} to '{name}' ({message})"


def typeerror(args: tuple, n: int, name: str, expected: str) -> Result:
    got = type_name(args[n - 1]) if n <= len(args) else "no value"
    return argerror(n, name, f"{expected} expected, got {got}")


def to_number(value: Any) -> float | int | None:
    """lua_tonumber: a number, or text that reads as one (decimal or 0x hex, spaces around); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if not isinstance(value, bytes):
        return None
    text = value.strip(b" \t\n\r\f\v")
    if not text or b"_" in text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        sign = -1.0 if text[:1] == b"-" else 1.0
        body = text.lstrip(b"+-")
        if body[:2].lower() == b"0x":
            return sign * float.fromhex(body.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        pass
    return None


def to_text(value: Any) -> bytes | None:
    """luaL_checklstring: a string, or a number written as Lua writes it (%.14g)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return lua_number_text(value)
    return None


def lua_number_text(number: float | int) -> bytes:
    if isinstance(number, float) and not math.isfinite(number):
        return b"nan" if number != number else (b"inf" if number > 0 else b"-inf")
    return (b"%.14g" % number)


def truncate(number: float | int) -> int:
    """C's cast of a double to an integer (toward zero); infinities and NaN as x86-64 makes them."""
    if isinstance(number, int):
        return number
    if not math.isfinite(number):
        return -(2**63)
    return int(number)


# -- bit (LuaBitOp 1.0.2) ----------------------------------------------------------------------

def _bits(args: tuple, n: int, name: str) -> int | Result:
    """LuaBitOp's barg: the number's low 32 bits after adding 2^52+2^51 (so rounded to nearest)."""
    value = to_number(args[n - 1]) if n <= len(args) else None
    number = float(value) if value is not None else 0.0
    bits = _struct.unpack("<Q", _struct.pack("<d", number + 6755399441055744.0))[0] & 0xFFFFFFFF
    if bits == 0 and value is None:
        return typeerror(args, n, name, "number")
    return bits


def _signed(bits: int) -> int:
    bits &= 0xFFFFFFFF
    return bits - (1 << 32) if bits & 0x80000000 else bits


def _unary(name: str, op: Callable[[int], int]) -> Callable[..., Result]:
    def function(*args: Any) -> Result:
        value = _bits(args, 1, name)
        if isinstance(value, tuple):
            return value
        return True, _signed(op(value))
    return function


def _fold(name: str, op: Callable[[int, int], int]) -> Callable[..., Result]:
    def function(*args: Any) -> Result:
        value = _bits(args, 1, name)
        if isinstance(value, tuple):
            return value
        for n in range(2, len(args) + 1):
            other = _bits(args, n, name)
            if isinstance(other, tuple):
                return other
            value = op(value, other)
        return True, _signed(value)
    return function


def _shift(name: str, op: Callable[[int, int], int]) -> Callable[..., Result]:
    def function(*args: Any) -> Result:
        value = _bits(args, 1, name)
        if isinstance(value, tuple):
            return value
        count = _bits(args, 2, name)
        if isinstance(count, tuple):
            return count
        return True, _signed(op(value, count & 31))
    return function


def _tohex(*args: Any) -> Result:
    value = _bits(args, 1, "tohex")
    if isinstance(value, tuple):
        return value
    digits = "0123456789abcdef"
    width = 8
    if len(args) >= 2:
        width = _bits(args, 2, "tohex")
        if isinstance(width, tuple):
            return width
        width = _signed(width)
    if width == -(2**31):
        return True, b""
    if width < 0:
        width, digits = -width, digits.upper()
    width = min(width, 8)
    text = []
    for _ in range(width):
        text.append(digits[value & 15])
        value >>= 4
    return True, "".join(reversed(text)).encode()


def _rol(value: int, n: int) -> int:
    return ((value << n) | (value >> (32 - n))) & 0xFFFFFFFF


def _ror(value: int, n: int) -> int:
    return ((value >> n) | (value << (32 - n))) & 0xFFFFFFFF


BIT = {
    "tobit": _unary("tobit", lambda b: b),
    "bnot": _unary("bnot", lambda b: ~b),
    "bswap": _unary("bswap", lambda b: int.from_bytes(b.to_bytes(4, "little"), "big")),
    "band": _fold("band", lambda a, b: a & b),
    "bor": _fold("bor", lambda a, b: a | b),
    "bxor": _fold("bxor", lambda a, b: a ^ b),
    "lshift": _shift("lshift", lambda b, n: b << n),
    "rshift": _shift("rshift", lambda b, n: b >> n),
    "arshift": _shift("arshift", lambda b, n: _signed(b) >> n),
    "rol": _shift("rol", _rol),
    "ror": _shift("ror", _ror),
    "tohex": _tohex,
}


# -- struct (lua_struct.c, as in redis-server) ---------------------------------------------------

MAXINTSIZE = 32
MAXALIGN = 8
SIZES = {"b": 1, "B": 1, "h": 2, "H": 2, "l": 8, "L": 8, "T": 8, "f": 4, "d": 8, "x": 1}


class StructError(Exception):
    """A format or data error, in lua_struct's words (the message of the Lua error)."""


class Format:
    """Reads a format string as lua_struct does: one option at a time, with its size."""

    def __init__(self, fmt: bytes):
        self.text = fmt.decode("latin-1")
        self.at = 0
        self.little = True  # the native order (x86-64)
        self.align = 1

    def number(self, default: int) -> int:
        if self.at >= len(self.text) or not self.text[self.at].isdigit():
            return default
        value = 0
        while self.at < len(self.text) and self.text[self.at].isdigit():
            digit = ord(self.text[self.at]) - 48
            if value > (2**31 - 1) // 10 or value * 10 > (2**31 - 1) - digit:
                raise StructError("integral size overflow")
            value = value * 10 + digit
            self.at += 1
        return value

    def options(self):
        while self.at < len(self.text):
            option = self.text[self.at]
            self.at += 1
            yield option, self.size(option)

    def size(self, option: str) -> int:
        if option in SIZES:
            return SIZES[option]
        if option == "c":
            return self.number(1)
        if option in "iI":
            size = self.number(4)
            if size > MAXINTSIZE:
                raise StructError(f"integral size {size} is larger than limit of {MAXINTSIZE}")
            return size
        return 0

    def to_align(self, length: int, option: str, size: int) -> int:
        if size == 0 or option == "c":
            return 0
        size = min(size, self.align)
        return (size - (length & (size - 1))) & (size - 1)

    def control(self, option: str) -> None:
        if option == " ":
            return
        if option == ">":
            self.little = False
        elif option == "<":
            self.little = True
        elif option == "!":
            align = self.number(MAXALIGN)
            if align <= 0 or align & (align - 1):
                raise StructError(f"alignment {align} is not a power of 2")
            self.align = align
        else:
            raise StructError(f"bad argument #1 to '{{name}}' (invalid format option '{option}')")


def _struct_call(name: str, body: Callable[..., Result]) -> Callable[..., Result]:
    def function(*args: Any) -> Result:
        fmt = to_text(args[0]) if args else None
        if fmt is None:
            return typeerror(args, 1, name, "string")
        try:
            return body(Format(fmt), *args)
        except StructError as error:
            return False, str(error).replace("{name}", name)
    return function


def _pack_typeerror(args: tuple, n: int, expected: str) -> Result:
    # b_pack pushes a nil after its arguments (a mark before its buffer): the first missing one is that nil
    if n == len(args) + 1:
        return argerror(n, "pack", f"{expected} expected, got nil")
    return typeerror(args, n, "pack", expected)


def _struct_pack(fmt: Format, *args: Any) -> Result:
    out = bytearray()
    arg = 2
    for option, size in fmt.options():
        pad = fmt.to_align(len(out), option, size)
        out += b"\0" * pad
        if option in "bBhHlLTiI":
            number = to_number(args[arg - 1]) if arg <= len(args) else None
            if number is None:
                return _pack_typeerror(args, arg, "number")
            arg += 1
            value = truncate(number) & 0xFFFFFFFFFFFFFFFF
            raw = value.to_bytes(8, "little") + bytes(max(0, size - 8))
            raw = raw[:size]
            out += raw if fmt.little else raw[::-1]
        elif option == "x":
            out += b"\0"
        elif option in "fd":
            number = to_number(args[arg - 1]) if arg <= len(args) else None
            if number is None:
                return _pack_typeerror(args, arg, "number")
            arg += 1
            out += _pack_float(float(number), option, fmt.little)
        elif option in "cs":
            text = to_text(args[arg - 1]) if arg <= len(args) else None
            if text is None:
                return _pack_typeerror(args, arg, "string")
            arg += 1
            if size == 0:
                size = len(text)
            if len(text) < size:
                return argerror(arg, "pack", "string too short")
            out += text[:size]
            if option == "s":
                out += b"\0"
        else:
            fmt.control(option)
    return True, bytes(out)


def _pack_float(number: float, option: str, little: bool) -> bytes:
    order = "<" if little else ">"
    if option == "d":
        return _struct.pack(order + "d", number)
    try:
        return _struct.pack(order + "f", number)
    except OverflowError:  # C's cast to float gives an infinity
        return _struct.pack(order + "f", math.copysign(math.inf, number))


def _struct_unpack(fmt: Format, *args: Any) -> Result:
    data = to_text(args[1]) if len(args) >= 2 else None
    if data is None:
        return typeerror(args, 2, "unpack", "string")
    start = to_number(args[2]) if len(args) >= 3 and args[2] is not None else 1
    if start is None:
        return typeerror(args, 3, "unpack", "number")
    position = truncate(start) - 1
    if position < 0:
        return argerror(3, "unpack", "offset must be 1 or greater")
    values: list[Any] = []
    for option, size in fmt.options():
        position += fmt.to_align(position, option, size)
        if position + size > len(data):
            return argerror(2, "unpack", "data string too short")
        if len(values) >= MAX_RESULTS:
            return False, "stack overflow (too many results)"
        if option in "bBhHlLTiI":
            raw = data[position:position + size]
            number = int.from_bytes(raw if fmt.little else raw[::-1], "little") & 0xFFFFFFFFFFFFFFFF
            if option.islower() and size and number & (1 << (min(size, 8) * 8 - 1)):
                number -= 1 << (min(size, 8) * 8)
            values.append(float(number) if abs(number) >= 2**53 else number)
        elif option in "fd":
            raw = data[position:position + size]
            values.append(_struct.unpack(("<" if fmt.little else ">") + option, raw)[0])
        elif option == "c":
            if size == 0:
                if not values or not isinstance(values[-1], (int, float)):
                    return False, "format 'c0' needs a previous size"
                size = truncate(values.pop())
                if size < 0 or position + size > len(data):
                    return argerror(2, "unpack", "data string too short")
            values.append(data[position:position + size])
        elif option == "s":
            end = data.find(b"\0", position)
            if end < 0:
                return False, "unfinished string in data"
            size = end - position + 1
            values.append(data[position:end])
        elif option != "x":
            fmt.control(option)
        position += size
    return (True, *values, position + 1)


def _struct_size(fmt: Format, *args: Any) -> Result:
    position = 0
    for option, size in fmt.options():
        position += fmt.to_align(position, option, size)
        if option == "s":
            return argerror(1, "size", "option 's' has no fixed size")
        if option == "c" and size == 0:
            return argerror(1, "size", "option 'c0' has no fixed size")
        if not option.isalnum():
            fmt.control(option)
        position += size
    return True, position


STRUCT = {
    "pack": _struct_call("pack", _struct_pack),
    "unpack": _struct_call("unpack", _struct_unpack),
    "size": _struct_call("size", _struct_size),
}


# -- cmsgpack (lua-cmsgpack 0.4.0, as in redis-server) -------------------------------------------

MAX_NESTING = 16  # deeper tables pack as nil, so a table that holds itself still packs


class Packer:
    def __init__(self, checkpoint: Callable[[], None]):
        self.out = bytearray()
        self.checkpoint = checkpoint
        self.nodes = 0

    def value(self, value: Any, level: int) -> None:
        self.nodes += 1
        if self.nodes & 1023 == 0:
            self.checkpoint()
        out = self.out
        kind = type_name(value)
        if kind == "table" and level == MAX_NESTING:
            kind = "nil"
        if kind == "string":
            length = len(value)
            if length < 32:
                out.append(0xA0 | length)
            elif length <= 0xFF:
                out += bytes((0xD9, length))
            elif length <= 0xFFFF:
                out += b"\xda" + length.to_bytes(2, "big")
            else:
                out += b"\xdb" + length.to_bytes(4, "big")
            out += value
        elif kind == "boolean":
            out.append(0xC3 if value else 0xC2)
        elif kind == "number":
            self.number(value)
        elif kind == "table":
            self.table(value, level)
        else:
            out.append(0xC0)

    def number(self, value: float | int) -> None:
        number = float(value)
        if math.isfinite(number) and number == int(number) and -(2**63) <= number < 2**63:
            self.integer(int(number))
            return
        try:
            single = _struct.pack(">f", number)
            if _struct.unpack(">f", single)[0] == number:
                self.out += b"\xca" + single
                return
        except OverflowError:
            pass
        self.out += b"\xcb" + _struct.pack(">d", number)

    def integer(self, n: int) -> None:
        out = self.out
        if n >= 0:
            if n <= 127:
                out.append(n)
            elif n <= 0xFF:
                out += bytes((0xCC, n))
            elif n <= 0xFFFF:
                out += b"\xcd" + n.to_bytes(2, "big")
            elif n <= 0xFFFFFFFF:
                out += b"\xce" + n.to_bytes(4, "big")
            else:
                out += b"\xcf" + n.to_bytes(8, "big")
        elif n >= -32:
            out.append(n & 0xFF)
        elif n >= -128:
            out += b"\xd0" + n.to_bytes(1, "big", signed=True)
        elif n >= -32768:
            out += b"\xd1" + n.to_bytes(2, "big", signed=True)
        elif n >= -(2**31):
            out += b"\xd2" + n.to_bytes(4, "big", signed=True)
        else:
            out += b"\xd3" + n.to_bytes(8, "big", signed=True)

    def table(self, table: Any, level: int) -> None:
        items = list(table.items())  # lua_next's order, as lua-cmsgpack walks it
        count, largest = 0, 0
        is_array = True
        for key, _ in items:
            if isinstance(key, bool) or not isinstance(key, (int, float)) or key <= 0 or key != int(key) \
                    or key >= 2**31:
                is_array = False
                break
            largest = max(largest, int(key))
            count += 1
        if is_array and largest == count:
            self.header(count, 0x90, 0xDC)
            for index in range(1, count + 1):
                self.value(table[index], level + 1)
        else:
            self.header(len(items), 0x80, 0xDE)
            for key, item in items:
                self.value(key, level + 1)
                self.value(item, level + 1)

    def header(self, count: int, fixed: int, sized: int) -> None:
        if count <= 15:
            self.out.append(fixed | count)
        elif count <= 0xFFFF:
            self.out += bytes((sized,)) + count.to_bytes(2, "big")
        else:
            self.out += bytes((sized + 1,)) + count.to_bytes(4, "big")


class Truncated(Exception):
    pass


class BadFormat(Exception):
    pass


class Unpacker:
    def __init__(self, data: bytes, at: int, runtime: Any, checkpoint: Callable[[], None]):
        self.data, self.at, self.runtime, self.checkpoint = data, at, runtime, checkpoint
        self.nodes = 0

    def need(self, count: int) -> bytes:
        if self.at + count > len(self.data):
            raise Truncated
        chunk = self.data[self.at:self.at + count]
        self.at += count
        return chunk

    def value(self) -> Any:
        self.nodes += 1
        if self.nodes & 1023 == 0:
            self.checkpoint()
        first = self.need(1)[0]
        if first <= 0x7F:
            return first
        if first >= 0xE0:
            return first - 0x100
        if 0xA0 <= first <= 0xBF:
            return self.need(first & 0x1F)
        if 0x90 <= first <= 0x9F:
            return self.array(first & 0x0F)
        if 0x80 <= first <= 0x8F:
            return self.map(first & 0x0F)
        fixed = {0xCC: (1, False), 0xCD: (2, False), 0xCE: (4, False), 0xCF: (8, False),
                 0xD0: (1, True), 0xD1: (2, True), 0xD2: (4, True), 0xD3: (8, True)}
        if first in fixed:
            size, signed = fixed[first]
            number = int.from_bytes(self.need(size), "big", signed=signed)
            return float(number) if abs(number) >= 2**53 else number
        if first == 0xC0:
            return None
        if first in (0xC2, 0xC3):
            return first == 0xC3
        if first == 0xCA:
            return _struct.unpack(">f", self.need(4))[0]
        if first == 0xCB:
            return _struct.unpack(">d", self.need(8))[0]
        if first in (0xD9, 0xDA, 0xDB):
            size = int.from_bytes(self.need({0xD9: 1, 0xDA: 2, 0xDB: 4}[first]), "big")
            return self.need(size)
        if first in (0xDC, 0xDD):
            return self.array(int.from_bytes(self.need(2 if first == 0xDC else 4), "big"))
        if first in (0xDE, 0xDF):
            return self.map(int.from_bytes(self.need(2 if first == 0xDE else 4), "big"))
        raise BadFormat

    def array(self, count: int) -> Any:
        table = self.runtime.table()
        for index in range(1, count + 1):  # each element takes at least a byte: bounded by the input
            item = self.value()
            if item is not None:
                table[index] = item
        return table

    def map(self, count: int) -> Any:
        table = self.runtime.table()
        for _ in range(count):
            key, item = self.value(), self.value()
            if key is None:
                raise LuaTableError("table index is nil")
            if isinstance(key, float) and key != key:
                raise LuaTableError("table index is NaN")
            table[key] = item
        return table


class LuaTableError(Exception):
    pass


def cmsgpack(runtime: Any, checkpoint: Callable[[], None]) -> dict[str, Callable[..., Result]]:
    def pack(*args: Any) -> Result:
        if not args:
            return argerror(0, "pack", "MessagePack pack needs input.")
        packer = Packer(checkpoint)
        for value in args:
            packer.value(value, 0)
        return True, bytes(packer.out)

    def unpack_full(name: str, args: tuple, limit: int, offset: int) -> Result:
        data = to_text(args[0]) if args else None
        if data is None:
            return typeerror(args, 1, name, "string")
        if offset < 0 or limit < 0:
            return False, f"Invalid request to unpack with offset of {offset} and limit of {len(data)}."
        if offset > len(data):
            return False, f"Start offset {offset} greater than input length {len(data)}."
        decode_all = not limit and not offset
        limit = 2**31 - 1 if decode_all else limit
        unpacker = Unpacker(data, offset, runtime, checkpoint)
        values: list[Any] = []
        try:
            while unpacker.at < len(data) and len(values) < limit:
                if len(values) >= MAX_RESULTS:
                    return False, "too many return values at once; use unpack_one or unpack_limit instead."
                values.append(unpacker.value())
        except Truncated:
            return False, "Missing bytes in input."
        except BadFormat:
            return False, "Bad data format in input."
        except LuaTableError as error:
            return False, str(error)
        except RecursionError:
            return False, "stack overflow (too deeply nested data)"
        if not decode_all:
            values.insert(0, -1 if unpacker.at == len(data) else unpacker.at)
        return (True, *values)

    def integer(args: tuple, n: int, name: str, default: int | None) -> int | Result:
        if n > len(args) or args[n - 1] is None:
            if default is None:
                return typeerror(args, n, name, "number")
            return default
        number = to_number(args[n - 1])
        if number is None:
            return typeerror(args, n, name, "number")
        return truncate(number)

    def unpack(*args: Any) -> Result:
        return unpack_full("unpack", args, 0, 0)

    def unpack_one(*args: Any) -> Result:
        offset = integer(args, 2, "unpack_one", 0)
        return offset if isinstance(offset, tuple) else unpack_full("unpack_one", args, 1, offset)

    def unpack_limit(*args: Any) -> Result:
        limit = integer(args, 2, "unpack_limit", None)
        if isinstance(limit, tuple):
            return limit
        offset = integer(args, 3, "unpack_limit", 0)
        return offset if isinstance(offset, tuple) else unpack_full("unpack_limit", args, limit, offset)

    return {"pack": pack, "unpack": unpack, "unpack_one": unpack_one, "unpack_limit": unpack_limit}


CMSGPACK_VALUES = {"_NAME": b"cmsgpack", "_VERSION": b"lua-cmsgpack 0.4.0",
                   "_COPYRIGHT": b"Copyright (C) 2012, Salvatore Sanfilippo",
                   "_DESCRIPTION": b"MessagePack C implementation for Lua"}


# -- cjson (lua-cjson 2.1.0, as in redis-server, with its default settings) -----------------------

MAX_DEPTH = 1000
MAX_JSON = 16 * 2**20  # bytes of JSON cjson.decode takes (a sixteenth of a script's Lua memory)
JSON_ESCAPES = {**{i: b"\\u%04x" % i for i in range(32)}, 8: b"\\b", 9: b"\\t", 10: b"\\n", 12: b"\\f",
                13: b"\\r", 34: b'\\"', 92: b"\\\\", 47: b"\\/", 127: b"\\u007f"}
JSON_SPECIAL = re.compile(rb'[\x00-\x1f"\\\\/\x7f]')


def _json_string(value: bytes) -> bytes:
    return b'"' + JSON_SPECIAL.sub(lambda match: JSON_ESCAPES[match.group()[0]], value) + b'"'


class JsonEncoder:
    def __init__(self, null: Any, checkpoint: Callable[[], None]):
        self.null, self.checkpoint = null, checkpoint
        self.out: list[bytes] = []
        self.nodes = 0

    def value(self, value: Any, depth: int) -> None:
        self.nodes += 1
        if self.nodes & 1023 == 0:
            self.checkpoint()
        out = self.out
        if value is None or value is self.null:
            out.append(b"null")
        elif isinstance(value, bool):
            out.append(b"true" if value else b"false")
        elif isinstance(value, (int, float)):
            if isinstance(value, float) and not math.isfinite(value):
                raise JsonError("Cannot serialise number: must not be NaN or Inf")
            out.append(b"%.14g" % value)
        elif isinstance(value, bytes):
            out.append(_json_string(value))
        elif type_name(value) == "table":
            self.table(value, depth + 1)
        else:
            raise JsonError(f"Cannot serialise {type_name(value)}: type not supported")

    def table(self, table: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise JsonError(f"Cannot serialise, excessive nesting ({depth})")
        items = list(table.items())  # lua_next's order, as lua-cjson walks it
        largest, count = 0, 0
        for key, _ in items:
            if isinstance(key, bool) or not isinstance(key, (int, float)) or not key >= 1 or key != math.floor(key):
                largest = -1
                break
            largest, count = max(largest, int(key)), count + 1
        if largest > 0 and largest > count * 2 and largest > 10:
            raise JsonError("Cannot serialise table: excessively sparse array")
        out = self.out
        if largest > 0:
            out.append(b"[")
            for index in range(1, largest + 1):
                if index > 1:
                    out.append(b",")
                self.value(table[index], depth)
            out.append(b"]")
            return
        out.append(b"{")
        for n, (key, item) in enumerate(items):
            if n:
                out.append(b",")
            if isinstance(key, bytes):
                out.append(_json_string(key))
            elif isinstance(key, (int, float)) and not isinstance(key, bool):
                out.append(b'"%.14g"' % key)
            else:
                raise JsonError(f"Cannot serialise {type_name(key)}: table key must be a number or string")
            out.append(b":")
            self.value(item, depth)
        out.append(b"}")


class JsonError(Exception):
    pass


def _from_json(value: Any, null: Any) -> Any:
    if value is None:
        return null
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**53:
        return float(value)  # lua-cjson reads numbers with strtod
    if isinstance(value, list):
        return [_from_json(item, null) for item in value]
    if isinstance(value, dict):
        return {_from_json(key, null): _from_json(item, null) for key, item in value.items()}
    return value


def _too_deep_at(text: bytes) -> int:
    """Where lua-cjson stops a document nested too deep: the position of the opening bracket past
    MAX_DEPTH (only looked for once Python's parser has given up)."""
    depth, in_string, escaped = 0, False, False
    for at, char in enumerate(text, 1):
        if in_string:
            if escaped:
                escaped = False
            elif char == 0x5C:
                escaped = True
            elif char == 0x22:
                in_string = False
        elif char == 0x22:
            in_string = True
        elif char in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_DEPTH:
                return at
        elif char in (0x5D, 0x7D):
            depth -= 1
    return len(text)


def cjson(runtime: Any, null: Any, checkpoint: Callable[[], None]) -> dict[str, Callable[..., Result]]:
    def encode(*args: Any) -> Result:
        if len(args) != 1:
            return argerror(1, "encode", "expected 1 argument")
        encoder = JsonEncoder(null, checkpoint)
        try:
            encoder.value(args[0], 0)
        except JsonError as error:
            return False, str(error)
        except RecursionError:
            return False, f"Cannot serialise, excessive nesting ({MAX_DEPTH + 1})"
        return True, b"".join(encoder.out)

    def decode(*args: Any) -> Result:
        if len(args) != 1:
            return argerror(1, "decode", "expected 1 argument")
        text = to_text(args[0])
        if text is None:
            return typeerror(args, 1, "decode", "string")
        if len(text) > MAX_JSON:
            # Python's parse holds every value as an object before Lua gets one: bounded here
            return False, f"JSON text over {MAX_JSON // 2**20} MiB: more than the embedded broker decodes"
        try:
            value = _from_json(json.loads(text.decode("utf-8", "surrogateescape")), null)
        except RecursionError:
            return False, f"Found too many nested data structures ({MAX_DEPTH + 1}) at character {_too_deep_at(text)}"
        except json.JSONDecodeError as error:
            return False, f"Expected value but found invalid token at character {error.pos + 1}"
        except (ValueError, UnicodeError):
            return False, "Expected value but found invalid token"
        if isinstance(value, (dict, list)):
            value = runtime.table_from(value, recursive=True)
        return True, value

    def setting(*defaults: Any) -> Callable[..., Result]:
        return lambda *args: (True, *defaults)  # accepted; this encoder keeps Redis' defaults

    return {"encode": encode, "decode": decode, "encode_max_depth": setting(1000),
            "decode_max_depth": setting(1000), "encode_number_precision": setting(14),
            "encode_sparse_array": setting(False, 2, 10), "encode_keep_buffer": setting(True),
            "encode_invalid_numbers": setting(False), "decode_invalid_numbers": setting(True)}


# -- math.random (redis-server's rand.c) ----------------------------------------------------------

INT32_MAX = 2**31 - 1


class RedisRandom:
    """redis-server's math.random and math.randomseed: its own generator (POSIX lrand48's, 48 bits),
    seeded when the server starts and by randomseed only, so a script draws the numbers
    redis-server would give it in the same place."""

    def __init__(self) -> None:
        self.state = 0x1234ABCD330E

    def next(self) -> int:
        self.state = (0x5DEECE66D * self.state + 0xB) & (2**48 - 1)
        return self.state >> 17

    @staticmethod
    def checkint(args: tuple, n: int, name: str) -> int | Result:
        """luaL_checkint: a number (or numeric text), truncated toward zero to a C int."""
        number = to_number(args[n - 1]) if n <= len(args) else None
        if number is None:
            return typeerror(args, n, name, "number")
        value = truncate(number) & 0xFFFFFFFF
        return value - 2**32 if value & 0x80000000 else value

    def random(self, *args: Any) -> Result:
        r = (self.next() % INT32_MAX) / INT32_MAX
        if not args:
            return True, r
        if len(args) > 2:
            return False, "wrong number of arguments"
        bounds = [self.checkint(args, n, "random") for n in range(1, len(args) + 1)]
        for bound in bounds:
            if isinstance(bound, tuple):
                return bound
        low, high = (1, bounds[0]) if len(bounds) == 1 else bounds
        if low > high:
            return argerror(len(bounds), "random", "interval is empty")
        return True, math.floor(r * (high - low + 1)) + low

    def randomseed(self, *args: Any) -> Result:
        seed = self.checkint(args, 1, "randomseed")
        if isinstance(seed, tuple):
            return seed
        self.state = ((seed & 0xFFFFFFFF) << 16) | 0x330E
        return (True,)


def libraries(runtime: Any, null: Any, checkpoint: Callable[[], None]) -> tuple[dict, dict]:
    """Each library's Python functions, and its constant fields (math's are added to Lua's)."""
    generator = RedisRandom()
    functions = {"bit": BIT, "struct": STRUCT, "cmsgpack": cmsgpack(runtime, checkpoint),
                 "cjson": cjson(runtime, null, checkpoint),
                 "math": {"random": generator.random, "randomseed": generator.randomseed}}
    values = {"cmsgpack": CMSGPACK_VALUES, "cjson": {"_NAME": b"cjson", "_VERSION": b"2.1.0", "null": null}}
    return functions, values
