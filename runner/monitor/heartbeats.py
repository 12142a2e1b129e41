"""The heartbeat keys workers and beat write on the broker (runner.worker_heartbeat,
runner.beat_scheduler), and when one is late: read by `doctor` and by /health outside `up`."""

from __future__ import annotations

from runner.strict_json import loads_or_none

# A heartbeat is late past this many of its writer's intervals (plus LATE_SLACK seconds): generous,
# so a busy laptop does not raise false alarms, yet seconds, not minutes.
LATE_INTERVALS = 3
LATE_SLACK = 5.0


def _number(heartbeat: dict, name: str, default: float) -> float:
    value = heartbeat.get(name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def age(heartbeat: dict, now: float) -> float:
    return max(0.0, now - _number(heartbeat, "at", 0.0))


def late(heartbeat: dict, now: float) -> bool:
    return age(heartbeat, now) > LATE_INTERVALS * (_number(heartbeat, "interval", 1.0) or 1.0) + LATE_SLACK


def read_heartbeats(client, prefix: str) -> dict[str, dict]:
    """Every heartbeat key under `prefix`: the rest of the key name → its value."""
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    found = {}
    for key, raw in zip(keys, client.mget(keys) if keys else [], strict=True):
        if raw is None:  # expired between SCAN and MGET
            continue
        value = loads_or_none(raw)  # bounded: anyone with the password may write these keys
        if value is None:
            continue
        name = key.decode() if isinstance(key, bytes) else key
        found[name[len(prefix):]] = value if isinstance(value, dict) else {}
    return found
