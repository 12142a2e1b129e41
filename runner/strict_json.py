"""JSON from outside (request bodies, plugin manifests), strictly: what Python's json module accepts
but our storage, the broker's serializer or another JSON parser would choke on is refused here,
naming where it is.

Python's parser recurses (1,000 nested arrays raised RecursionError), reads `NaN`, `Infinity` and
`1e400` (not JSON; they came back out as `NaN`), keeps the last of two equal keys (another parser
keeps the first), and returns strings with lone surrogates (UTF-8 cannot encode them: SQLite and
kombu failed later) or NUL. Each of these is a `JsonRefused` whose `field` is the path of the
value at fault (`args[0]`, `kwargs.to`) and whose message says what is allowed.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64  # arrays and objects nested in one another
MAX_INTEGER_DIGITS = 19  # a 64-bit integer; longer digit strings are refused before int() reads them
INTEGER_RANGE = (-(2**63), 2**63 - 1)
BAD_CHARACTER = re.compile("[\x00\ud800-\udfff]")


class JsonRefused(ValueError):
    """The body is refused: `field` is the path of the value at fault (None: the body itself)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class _NotJson:
    """A number the parser met that JSON cannot carry (NaN, Infinity, a too long integer): kept
    as a marker so that the walk, which knows the path, can name it."""

    def __init__(self, text: str, why: str):
        self.text, self.why = text, why


class _Duplicated(dict):
    """An object in which a key appeared twice (the walk names it)."""

    duplicate: str = ""


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    result = dict(pairs)
    if len(result) == len(pairs):
        return result
    marked = _Duplicated(result)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            marked.duplicate = key
            break
        seen.add(key)
    return marked


def _integer(text: str) -> Any:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        return _NotJson(text, "an integer of more than 64 bits")
    value = int(text)
    return value if INTEGER_RANGE[0] <= value <= INTEGER_RANGE[1] else _NotJson(text, "an integer of more than 64 bits")


def _constant(text: str) -> Any:
    return _NotJson(text, f"{text}, which is not JSON")


def _decoder() -> json.JSONDecoder:
    return json.JSONDecoder(object_pairs_hook=_pairs, parse_int=_integer, parse_constant=_constant)


_DECODER = _decoder()


def _where(path: str) -> str:
    return f"{path!r}" if path else "the body"


def _shown(text: str) -> str:
    return repr(text[:40] + ("…" if len(text) > 40 else ""))


def _check_text(text: str, path: str, what: str) -> None:
    bad = BAD_CHARACTER.search(text)
    if bad is None:
        return
    if bad.group() == "\x00":
        raise JsonRefused(f"{what} holds a NUL character (\\u0000), which is not allowed", path or None)
    raise JsonRefused(f"{what} holds a lone surrogate (\\u{ord(bad.group()):04x}): strings must be valid Unicode "
                      "(a surrogate only as half of an escaped pair)", path or None)


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def check(value: Any) -> None:
    """Raise JsonRefused for the first value that JSON (or UTF-8) cannot carry, or nesting deeper
    than MAX_DEPTH. Iterative: a deep value must not make this recurse either."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, path, _where(path))
        elif isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                top = re.match(r"[^.[]+|\[\d+\]", path).group()  # the field it is in; the whole path is long
                raise JsonRefused(f"{_where(top)} nests arrays and objects deeper than {MAX_DEPTH} levels", top)
            if isinstance(item, _Duplicated):
                key = _child(path, item.duplicate)
                raise JsonRefused(f"the key {_shown(item.duplicate)} appears twice in {_where(path)}; keys must be "
                                  "unique", key)
            if isinstance(item, dict):
                for key, member in item.items():
                    _check_text(key, path, f"a key of {_where(path)} ({_shown(key)})")
                    stack.append((member, _child(path, key), depth + 1))
            else:
                stack.extend((member, _child(path, index), depth + 1) for index, member in enumerate(item))
        elif isinstance(item, _NotJson):
            raise JsonRefused(f"{_where(path)} is {item.why} ({_shown(item.text)}); numbers must be finite and "
                              "integers fit in 64 bits", path or None)
        elif isinstance(item, float) and not math.isfinite(item):
            raise JsonRefused(f"{_where(path)} is a number too large for a 64-bit float; numbers must be finite",
                              path or None)


def loads(raw: bytes | str) -> Any:
    """The JSON document in `raw`, checked; JsonRefused says why one is not accepted."""
    try:  # as json.loads reads bytes: UTF-8, or UTF-16/32 told by the first bytes
        text = raw.decode(json.detect_encoding(raw)) if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as error:
        raise JsonRefused(f"the body is not valid JSON: it is not UTF-8 ({error.reason} at byte {error.start})") \
            from None
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise JsonRefused(f"the body nests arrays and objects deeper than {MAX_DEPTH} levels") from None
    except ValueError as error:
        raise JsonRefused(f"the body is not valid JSON: {error}") from None
    check(value)
    return value


MAX_SHOWN_VALUE = 4 * 1024 * 1024  # bytes of a broker value parsed to be shown (a message with 1 MB of arguments)


def _within_depth(value: Any, max_depth: int) -> bool:
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= max_depth:
                return False
            stack.extend((member, depth + 1) for member in (item.values() if isinstance(item, dict) else item))
    return True


def loads_or_none(raw: bytes | str | None, max_bytes: int = MAX_SHOWN_VALUE) -> Any:
    """`raw` parsed, or None when it is missing, larger than `max_bytes`, not JSON or nested deeper
    than MAX_DEPTH: for what another program wrote (values on the broker any client with its
    password may have set, an http node's response), read to show or pass on, never trusted.
    10,000 nested arrays in a message raised RecursionError through /v1/queues; 900 parse, and
    then fail whoever writes them out again (json.dumps recurses too)."""
    if raw is None or len(raw) > max_bytes:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if _within_depth(value, MAX_DEPTH) else None
