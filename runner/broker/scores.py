"""Numbers as Redis reads them, where Python's float() reads more (or reads otherwise)."""

from __future__ import annotations

import math

ZADD_OPTIONS = frozenset({b"NX", b"XX", b"GT", b"LT", b"CH", b"INCR"})


def redis_double(raw: bytes) -> float | None:
    """A number as Redis reads one (strtod over the whole text): None where Redis refuses it:
    leading space, anything left over, NaN, a result too big (or too small) for a double."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text or text[0].isspace() or text != text.rstrip() or "_" in text:
        return None
    body = text.lstrip("+-")
    try:
        value = float.fromhex(text) if body[:2].lower() == "0x" else float(text)
    except (ValueError, OverflowError):
        return None
    if value != value:
        return None
    if math.isinf(value) and body.lower() not in ("inf", "infinity"):
        return None  # overflow
    mantissa = body.lower().split("e")[0] if body[:2].lower() != "0x" else body[2:].lower().split("p")[0]
    if value == 0.0 and mantissa.strip("0.") != "":
        return None  # underflow to zero
    return value


def zadd_scores(args: list[bytes]) -> list[bytes] | None:
    """ZADD's arguments (key score member …, no options) with the scores as fakeredis reads them
    (it refuses hex, takes `1_0`), or None when Redis refuses a score. Redis reads every score
    before it looks at the key, so that error comes before WRONGTYPE (in fakeredis, after).
    Anything else (options, a syntax error) goes to fakeredis unchanged."""
    rest = args[1:]
    if not rest or len(rest) % 2 or any(score.upper() in ZADD_OPTIONS for score in rest[0::2]):
        return args
    out = [args[0]]
    for at in range(0, len(rest), 2):
        value = redis_double(rest[at])
        if value is None:
            return None
        out += [repr(value).encode(), rest[at + 1]]
    return out
