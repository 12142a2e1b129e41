"""Monitoring facts written for people: durations and ages, moments, shortened arguments, and a
queue's recent depths as a sparkline. Pure functions of their input (no broker, no clock of their
own), shared by the commands and anything else that shows these facts as text."""

from __future__ import annotations

import datetime
import json
from typing import Any, Sequence

NONE = "-"  # what an unknown or empty value reads as
SPARKS = "▁▂▃▄▅▆▇█"


def duration(seconds: float | None) -> str:
    """'3 s', '4 min', '2 h 5 min', '3 d 1 h': the two largest units, seconds only under a minute."""
    if seconds is None:
        return NONE
    days, rest = divmod(int(max(0.0, seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days} d"] * bool(days) + [f"{hours} h"] * bool(hours) + [f"{minutes} min"] * bool(minutes)
    return " ".join(parts[:2]) if parts else f"{secs} s"


def clock(stamp: float | None) -> str:
    """A moment as local wall-clock time (as `up` prints its lines), with the date when not today."""
    if stamp is None:
        return NONE
    when = datetime.datetime.fromtimestamp(stamp)
    return when.strftime("%H:%M:%S" if when.date() == datetime.date.today() else "%Y-%m-%d %H:%M:%S")


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def call_arguments(args: Any, kwargs: Any) -> str:
    """A task's arguments as they would be written in a call: `"kb-1", 3, force=true` (JSON values).
    A reply already made text (Celery's `argsrepr`) is shown as it is."""
    def text(item: Any) -> str:
        return json.dumps(item, ensure_ascii=False, default=str)

    parts = [args] if isinstance(args, str) else [text(item) for item in args or ()]
    if isinstance(kwargs, str):
        parts.append(kwargs)
    else:
        parts += [f"{key}={text(item)}" for key, item in (kwargs or {}).items()]
    return ", ".join(part for part in parts if part not in ("", "()", "{}"))


def sparkline(values: Sequence[float]) -> str:
    """One block character per value, scaled from 0 to the largest value (all lowest when all 0)."""
    top = max(values, default=0)
    if top <= 0:
        return SPARKS[0] * len(values)
    return "".join(SPARKS[min(len(SPARKS) - 1, round(value / top * (len(SPARKS) - 1)))] for value in values)


def resample(points: Sequence[tuple[float, int]], start: float, end: float, buckets: int) -> list[int]:
    """Depth at the end of each of `buckets` equal slices of [start, end] from (time, depth) points,
    oldest first; a slice without a sample keeps the depth before it (none before: left out)."""
    width = (end - start) / buckets
    depths: list[int] = []
    ordered = sorted(points)
    index, current = 0, None
    for bucket in range(1, buckets + 1):
        edge = end if bucket == buckets else start + bucket * width  # the last one ends at `end` exactly
        while index < len(ordered) and ordered[index][0] <= edge:
            current = ordered[index][1]
            index += 1
        if current is not None:
            depths.append(current)
    return depths


def signed(change: int) -> str:
    return f"+{change}" if change > 0 else str(change)
