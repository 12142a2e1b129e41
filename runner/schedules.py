"""Claiming due workflow schedules and expiring trigger subscriptions, safely under concurrency.

Each claim runs in one write transaction (BEGIN IMMEDIATE takes SQLite's write lock before it
reads), so two pollers serialise: the second sees the schedule already moved to its next due time.
Every dispatched due time is also a row of schedule_dispatches, whose primary key (schedule, due
time) refuses a second dispatch of the same due time outright.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from runner import cron
from runner.store.database import Database

REFRESH_AHEAD = 600.0  # seconds before expiry a subscription is refreshed
REFRESH_HOLD = 120.0  # seconds a sent refresh holds its claim before another may be sent


@dataclass(frozen=True)
class Claim:
    schedule_id: str
    due_at: float
    task_id: str


@contextmanager
def _write(database: Database) -> Iterator:
    with database.connect() as db:
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.conn.execute("COMMIT")
        except BaseException:
            if db.conn.in_transaction:
                db.conn.execute("ROLLBACK")
            raise


def claim_batch(database: Database, limit: int, make_id: Callable[[], str], stamp: float | None = None) -> list[Claim]:
    """Claim up to `limit` due schedules: each due time recorded and moved to the next one."""
    stamp = time.time() if stamp is None else stamp
    claims: list[Claim] = []
    with _write(database) as db:
        due = list(db.query("SELECT id, cron, next_run_at FROM workflow_schedules WHERE enabled = 1 "
                            "AND next_run_at <= ? ORDER BY next_run_at LIMIT ?", [stamp, limit]))
        for row in due:
            try:
                following = cron.next_fire(row["cron"], stamp)
            except cron.CronError:  # stored before validation existed, or by hand: stop, do not loop on it
                db.execute("UPDATE workflow_schedules SET enabled = 0 WHERE id = ?", [row["id"]])
                continue
            # A schedule that missed several due times (the stack was down) fires once, for the
            # latest, and moves on to the next one after now.
            db.execute("UPDATE workflow_schedules SET next_run_at = ?, last_run_at = ? WHERE id = ?",
                       [following, stamp, row["id"]])
            claim = Claim(row["id"], row["next_run_at"], make_id())
            try:
                db.execute("INSERT INTO schedule_dispatches (schedule_id, due_at, task_id, dispatched_at) "
                           "VALUES (?, ?, ?, ?)", [claim.schedule_id, claim.due_at, claim.task_id, stamp])
            except sqlite3.IntegrityError:
                continue  # this due time was dispatched already
            claims.append(claim)
    return claims


def claim_due_schedules(database: Database, batch_size: int, max_dispatch: int, make_id: Callable[[], str],
                        send: Callable[[Claim], None]) -> list[Claim]:
    """Claim due schedules batch by batch, sending each batch's claims before the next is
    claimed, until none is due or `max_dispatch` (0: no limit) are sent."""
    sent: list[Claim] = []
    while True:
        limit = batch_size if not max_dispatch else min(batch_size, max_dispatch - len(sent))
        if limit <= 0:
            return sent
        batch = claim_batch(database, limit, make_id)
        for claim in batch:
            send(claim)
        sent.extend(batch)
        if len(batch) < limit:
            return sent


def claim_expiring_subscriptions(database: Database, stamp: float | None = None) -> list[str]:
    """Trigger subscriptions expiring within REFRESH_AHEAD seconds and not already being refreshed."""
    stamp = time.time() if stamp is None else stamp
    with _write(database) as db:
        ids = [row[0] for row in db.execute(
            "SELECT id FROM trigger_subscriptions WHERE expires_at <= ? "
            "AND (refresh_claimed_until IS NULL OR refresh_claimed_until < ?)", [stamp + REFRESH_AHEAD, stamp])]
        db.conn.executemany("UPDATE trigger_subscriptions SET refresh_claimed_until = ? WHERE id = ?",
                            [(stamp + REFRESH_HOLD, subscription_id) for subscription_id in ids])
    return ids
