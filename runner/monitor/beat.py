"""What beat says about itself on the broker: its heartbeat (written at every tick) and its schedule
(each entry's last and next run), both written by runner.beat_scheduler.HeartbeatScheduler."""

from __future__ import annotations

from typing import Any

from runner.broker_config import BEAT_HEARTBEAT_KEY, BEAT_SCHEDULE_KEY
from runner.monitor.channel import read_channel
from runner.strict_json import loads_or_none


def _decoded(raw: bytes | str | None) -> dict[str, Any] | None:
    value = loads_or_none(raw)
    return value if isinstance(value, dict) else None


def beat_state(app) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(heartbeat, published schedule), each None when beat has not written it lately (both expire
    a minute after beat stops ticking)."""
    with read_channel(app) as channel:
        heartbeat, schedule = channel.client.mget([BEAT_HEARTBEAT_KEY, BEAT_SCHEDULE_KEY])
    return _decoded(heartbeat), _decoded(schedule)
