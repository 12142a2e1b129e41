"""The Redis protocol (RESP): reading commands, writing replies.

Clients' commands are parsed by hiredis (`FastCommandReader`); `CommandReader` is ours, for a
client typing inline commands (telnet) or where hiredis is missing. The append-only log has a
stricter parser of its own (`aof.read_commands`): text there is corruption, not a command.
"""

from __future__ import annotations

from typing import Any

from fakeredis._helpers import SimpleError, SimpleString

CRLF = b"\r\n"
MAX_BULK = 512 * 1024 * 1024  # Redis' proto-max-bulk-len
MAX_INLINE = 64 * 1024


class Push(list):
    """A message the server pushes (pub/sub): RESP3's `>` type, an array in RESP2."""


class ProtocolError(Exception):
    """The bytes are not RESP: Redis answers with an error and closes the connection."""


class FastCommandReader:
    """Commands from a client, parsed by hiredis (C): about six times quicker than `CommandReader`
    on Celery's traffic. Only for clients that speak RESP, which all libraries do.

    `next_command` is hiredis' own `gets`, called for every command without a wrapper: it gives
    False while a command is incomplete, and anything RESP can hold, so the caller checks that
    the command is an array of bulk strings (the server's read loop does)."""

    def __init__(self) -> None:
        import hiredis

        self._reader = hiredis.Reader()
        self.feed = self._reader.feed
        self.next_command = self._reader.gets


def _protocol_errors() -> tuple[type[Exception], ...]:
    try:
        import hiredis
    except ImportError:
        return (ProtocolError,)
    return (ProtocolError, hiredis.ProtocolError)


PROTOCOL_ERRORS = _protocol_errors()


def reader_for(first_byte: bytes) -> "CommandReader | FastCommandReader":
    """hiredis for RESP; ours for a client typing inline commands (or where hiredis is missing)."""
    if first_byte == b"*":
        try:
            return FastCommandReader()
        except ImportError:
            pass
    return CommandReader()


class CommandReader:
    """Commands as they arrive: arrays of bulk strings, or inline commands (a line of words)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0  # where the next unread command begins in the buffer
        self.next_command = self._next

    def feed(self, data: bytes) -> None:
        if self._start > 65536 and self._start > len(self._buffer) // 2:
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    def _next(self) -> list[bytes] | None:
        buffer, start = self._buffer, self._start
        if start >= len(buffer):
            return None
        if buffer[start] != 0x2A:  # not "*": an inline command, one line of words
            end = buffer.find(b"\n", start)
            if end < 0:
                if len(buffer) - start > MAX_INLINE:
                    raise ProtocolError("too big inline request")
                return None
            words = bytes(buffer[start:end]).rstrip(b"\r").split()
            self._advance(end + 1)
            return words if words else self._next()
        end = buffer.find(CRLF, start)
        if end < 0:
            return None
        try:
            count = int(buffer[start + 1 : end])
        except ValueError:
            raise ProtocolError("invalid multibulk length") from None
        position = end + 2
        fields: list[bytes] = []
        for _ in range(count):
            if position >= len(buffer):
                return None
            if buffer[position] != 0x24:  # "$"
                raise ProtocolError(f"expected '$', got '{chr(buffer[position])}'")
            end = buffer.find(CRLF, position)
            if end < 0:
                return None
            try:
                length = int(buffer[position + 1 : end])
            except ValueError:
                raise ProtocolError("invalid bulk length") from None
            if not 0 <= length <= MAX_BULK:
                raise ProtocolError("invalid bulk length")
            data_start = end + 2
            data_end = data_start + length
            if data_end + 2 > len(buffer):
                return None
            if buffer[data_end : data_end + 2] != CRLF:
                raise ProtocolError("bulk string not terminated by CRLF")
            fields.append(bytes(buffer[data_start:data_end]))
            position = data_end + 2
        self._advance(position)
        return fields if fields else self._next()

    def _advance(self, position: int) -> None:
        self._start = position


def encode_command(fields: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(fields) + b"".join([b"$%d\r\n%s\r\n" % (len(field), field) for field in fields])


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def encode(value: Any, protocol: int = 2) -> bytes:
    """One reply, RESP2 or RESP3; strings are bulk strings unless the command made them simple.

    Checked by exact type, commonest first: this runs for every reply the broker sends.
    """
    kind = type(value)
    if kind is bytes:
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if kind is int and INT64_MIN <= value <= INT64_MAX:
        return b":%d\r\n" % value
    if kind is list or kind is Push:
        head = b">%d\r\n" if protocol == 3 and kind is Push else b"*%d\r\n"
        parts = [head % len(value)]
        for item in value:
            if type(item) is bytes:
                parts.append(b"$%d\r\n%s\r\n" % (len(item), item))
            else:
                parts.append(encode(item, protocol))
        return b"".join(parts)
    if kind is SimpleString:
        return b"+%s\r\n" % value.value
    return _encode_other(value, protocol)


def _encode_other(value: Any, protocol: int) -> bytes:
    if value is None:
        return b"_\r\n" if protocol == 3 else b"$-1\r\n"
    if isinstance(value, bytes):
        return encode(bytes(value), protocol)
    if isinstance(value, SimpleString):
        return b"+%s\r\n" % value.value
    if isinstance(value, bool):  # before int, which bool subclasses
        if protocol == 3:
            return b"#t\r\n" if value else b"#f\r\n"
        return b":1\r\n" if value else b":0\r\n"
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return b":%d\r\n" % value
        text = b"%d" % value
        return b"(%s\r\n" % text if protocol == 3 else b"$%d\r\n%s\r\n" % (len(text), text)
    if isinstance(value, (list, tuple)):
        head = b">%d\r\n" if protocol == 3 and isinstance(value, Push) else b"*%d\r\n"
        return head % len(value) + b"".join([encode(item, protocol) for item in value])
    if isinstance(value, SimpleError):
        return b"-%s\r\n" % value.value.encode().replace(b"\r", b" ").replace(b"\n", b" ")
    if isinstance(value, str):
        return encode(value.encode(), protocol)
    if isinstance(value, float):
        text = repr(value).encode() if value == value and abs(value) != float("inf") else (
            b"nan" if value != value else (b"inf" if value > 0 else b"-inf"))
        return b",%s\r\n" % text if protocol == 3 else b"$%d\r\n%s\r\n" % (len(text), text)
    if isinstance(value, dict):
        items = [part for pair in value.items() for part in pair]
        head = b"%%%d\r\n" % len(value) if protocol == 3 else b"*%d\r\n" % len(items)
        return head + b"".join(encode(item, protocol) for item in items)
    if isinstance(value, (set, frozenset)):
        head = b"~%d\r\n" if protocol == 3 else b"*%d\r\n"
        return head % len(value) + b"".join(encode(item, protocol) for item in value)
    if isinstance(value, Exception):
        return encode(SimpleError(f"ERR {value}"), protocol)
    raise TypeError(f"cannot encode a reply of type {type(value).__name__}")


NULL_ARRAY = {2: b"*-1\r\n", 3: b"_\r\n"}  # a blocking pop that timed out
