"""Which of the stack's processes cannot do their work, for /health.

Under `up`, its view: each process's state as `dify-local ps` shows it (a real probe made it ready, a
crash loop or code that does not load marks it failed). Without `up` (honcho, systemd, processes
started by hand) what they write on the broker: each worker node's heartbeat key and each beat's
instance key (runner.monitor.heartbeats). A worker killed or hung stops writing its key, and the key
expires a minute later: outside `up` a dead worker is reported for that minute, then no more (unless
it was the last one).
"""

from __future__ import annotations

import time
from typing import Any

from runner.broker_config import BEAT_INSTANCE_PREFIX, WORKER_HEARTBEAT_PREFIX
from runner.monitor.heartbeats import age, late, read_heartbeats

SERVING = ("ready", "reloading", "finished")  # reloading: the old process serves until the new one does
STOPPED = ("stopped", "stopping")  # on purpose (`dify-local stop`): reported, not a fault


def _why(row: dict[str, Any]) -> str:
    name, status, last_exit = row.get("name"), row.get("status"), row.get("last_exit")
    exited = f"last exit {last_exit}" if last_exit is not None else "no exit status"
    if status == "failed":
        return (f"{name} failed ({exited}): `dify-local logs {name}` says why, `dify-local start {name}` "
                "tries again")
    if status == "suspended":
        pid = row.get("pid")
        return f"{name} is suspended (SIGSTOP or a debugger; pid {pid}): `kill -CONT {pid}` resumes it"
    if status == "backoff":
        return f"{name} crashed ({exited}) and is restarted soon"
    return f"{name} is {status}, not ready yet"


def supervised_check(reply: dict[str, Any], own_pid: int) -> dict[str, Any]:
    """From `up`'s `ps` answer; the process answering (this API) counts as serving, whatever its row
    says while `up` has yet to see it ready, and one stopped on purpose is listed, not a fault."""
    rows = [row for row in reply.get("processes") or [] if isinstance(row, dict)]
    down = [row for row in rows if row.get("status") not in SERVING + STOPPED and row.get("pid") != own_pid]
    check: dict[str, Any] = {
        "ok": not down, "source": f"dify-local up (pid {(reply.get('supervisor') or {}).get('pid')})",
        "processes": {row.get("name"): row.get("status") for row in rows},
        "failed": [row.get("name") for row in down if row.get("status") == "failed"],
        "not_ready": [row.get("name") for row in down if row.get("status") != "failed"],
        "stopped": [row.get("name") for row in rows if row.get("status") in STOPPED],
    }
    if down:
        check["error"] = "; ".join(_why(row) for row in down)
    return check


def _beating(what: str, beats: dict[str, dict], now: float, *, stale_fails: bool) -> dict[str, Any]:
    live = sorted(name for name, beat in beats.items() if not late(beat, now))
    stale = {name: round(age(beat, now), 1) for name, beat in sorted(beats.items()) if name not in live}
    check: dict[str, Any] = {"ok": bool(live) and not (stale and stale_fails), "live": live, "stale": stale}
    gone = ", ".join(f"{name} stopped {seconds:.0f} s ago (killed or hung)" for name, seconds in stale.items())
    if not beats:
        check["error"] = f"no {what} is running (none has written its heartbeat in the last minute)"
    elif not live:
        check["error"] = f"no {what} is running: {gone}"
    elif stale and stale_fails:
        check["error"] = f"{gone}; the tasks it had taken wait until the broker gives them back"
    return check


def heartbeat_checks(client, now: float | None = None) -> dict[str, dict[str, Any]]:
    """From the keys on the broker (`client`: redis-py). A worker that stopped beating fails the
    check even beside live ones (it held tasks); a beat that stopped beside a live one was replaced."""
    now = time.time() if now is None else now
    return {"workers": _beating("worker", read_heartbeats(client, WORKER_HEARTBEAT_PREFIX), now, stale_fails=True),
            "beat": _beating("beat", read_heartbeats(client, BEAT_INSTANCE_PREFIX), now, stale_fails=False)}
