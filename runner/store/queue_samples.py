"""The queue_samples table: each queue's depth (and its oldest message's age) over time, so the
dashboard and `dify-local queues` can show trends. Written by beat every few seconds; old samples
are removed by retention."""

from __future__ import annotations

import time
from typing import Iterable

from runner.monitor.queues import QueueDepth
from runner.store.database import Database


def record_samples(database: Database, states: Iterable[QueueDepth], at: float | None = None) -> None:
    """One sample of every queue in `states`, all at the same time."""
    at = time.time() if at is None else at
    rows = [(at, state.name, state.depth, state.oldest_age(at)) for state in states]
    with database.transaction() as db:
        db.conn.executemany(
            "INSERT OR REPLACE INTO queue_samples (at, queue, depth, oldest_age) VALUES (?, ?, ?, ?)", rows)


def sample_history(database: Database, since: float,
                   queues: Iterable[str] | None = None) -> dict[str, list[tuple[float, int]]]:
    """(time, depth) of each queue sampled at or after `since`, oldest first."""
    wanted = None if queues is None else set(queues)
    history: dict[str, list[tuple[float, int]]] = {}
    with database.connect() as db:
        for row in db.query("SELECT at, queue, depth FROM queue_samples WHERE at >= ? ORDER BY at", [since]):
            if wanted is None or row["queue"] in wanted:
                history.setdefault(row["queue"], []).append((row["at"], row["depth"]))
    return history


def prune_samples(database: Database, before: float) -> int:
    """Delete samples taken before `before`; how many were deleted."""
    with database.transaction() as db:
        return db.execute("DELETE FROM queue_samples WHERE at < ?", [before]).rowcount
