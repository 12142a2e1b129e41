"""Beat's scheduler: Celery's persistent one, plus what it tells the rest of the stack at every tick.

- A heartbeat on the broker: how `up` knows beat is running (it has ticked); and one key per beat,
  so doctor tells a stale or a second beat.
- Its schedule on the broker (each entry with its last and next run), for the API and dashboard,
  which neither import the task modules nor open the schedule file beat holds.
- The queue sampler (runner.monitor.sampler): every queue's depth into queue_samples.

All through the broker, so they work for the embedded broker and real Redis alike.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from celery.beat import PersistentScheduler

from runner import safe_files
from runner.beat_schedule import BY_TASK
from runner.errors import StateError
from runner.broker_config import BEAT_HEARTBEAT_KEY, BEAT_SCHEDULE_KEY, beat_instance_key
from runner.topology import QUEUE_NAMES, ROUTES

log = logging.getLogger("dify_local.beat")

HEARTBEAT_TTL = 60  # seconds; a beat that stopped ticking disappears from the broker after this
# seconds: the schedule is written when an entry changes, else again after SCHEDULE_REFRESH so that it
# expires with the heartbeat soon after beat stops; rewriting it every tick would only grow the
# embedded broker's append-only log
SCHEDULE_REFRESH = 20


def _epoch(moment: datetime.datetime) -> float:
    if moment.tzinfo is None:  # beat's clock is UTC (celery_config: enable_utc)
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def _schedule_text(schedule: Any) -> str:
    """Celery's own description of a schedule we did not declare: '<freq: 1.00 minute>' → 'freq: 1.00 minute'."""
    return repr(schedule).strip("<>")


class HeartbeatScheduler(PersistentScheduler):
    _heartbeat_connection = None
    _published_entries: list[dict[str, Any]] | None = None
    _published_at = 0.0
    _publish_failed = False
    _sampler = None  # None: not started yet; False: none for this app

    def _open_schedule(self):
        """shelve opens the schedule by its path, and dbm follows a link at it: refuse one first."""
        path = Path(self.schedule_filename)
        safe_files.refuse_links(path.parent, [path.name + suffix for suffix in self.known_suffixes])
        return super()._open_schedule()

    def _destroy_open_corrupted_schedule(self, exc):
        if isinstance(exc, StateError):  # a link is not a corrupt schedule: Celery would remove it and go on
            raise exc
        return super()._destroy_open_corrupted_schedule(exc)

    def tick(self, *args, **kwargs):
        interval = super().tick(*args, **kwargs)
        self._heartbeat()
        self._publish_schedule()
        self._start_sampler()
        return interval

    def _broker(self):
        """The redis client of beat's own connection for the keys it writes, opened on first use."""
        if self._heartbeat_connection is None:
            self._heartbeat_connection = self.app.connection_for_write()
        return self._heartbeat_connection.default_channel.client

    def _heartbeat(self) -> None:
        value = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "at": time.time(),
                            "interval": self.max_interval})
        try:
            client = self._broker()
            client.set(BEAT_HEARTBEAT_KEY, value, ex=self._heartbeat_ttl())
            self._instance_heartbeat(client, value)
        except Exception as error:  # the broker may be restarting: retry at the next tick
            log.warning("could not write beat's heartbeat: %s", error)
            self._close_heartbeat()

    def _heartbeat_ttl(self) -> int:
        # outlive the longest wait between ticks (max_interval), which may be above HEARTBEAT_TTL
        return max(HEARTBEAT_TTL, int(3 * self.max_interval))

    def _instance_heartbeat(self, client, value: str) -> None:
        """This beat's own key beside the shared one: two beats on one broker (each sending every
        periodic task) show as two keys to `doctor`. Removed when this beat stops."""
        client.set(beat_instance_key(socket.gethostname(), os.getpid()), value, ex=self._heartbeat_ttl())

    def _forget_instance(self) -> None:
        try:
            if self._heartbeat_connection is not None:
                self._heartbeat_connection.default_channel.client.delete(
                    beat_instance_key(socket.gethostname(), os.getpid()))
        except Exception:  # broker gone: the key expires on its own
            pass

    def describe_schedule(self) -> list[dict[str, Any]]:
        """Each entry: name, task, queue, schedule in words, last run and next run (UNIX times)."""
        now = self.app.now()
        settings = getattr(getattr(self.app, "dify", None), "settings", None)
        described = []
        for name, entry in sorted(self.schedule.items()):
            periodic = BY_TASK.get(entry.task)
            try:
                next_run = round(_epoch(now + entry.schedule.remaining_estimate(entry.last_run_at)), 1)
            except Exception:  # a schedule of someone else's kind that cannot say
                next_run = None
            described.append({
                "name": name, "task": entry.task,
                "queue": (entry.options or {}).get("queue") or ROUTES.get(entry.task),
                "schedule": periodic.describe(settings) if periodic and settings else _schedule_text(entry.schedule),
                # a new entry's last_run_at is when beat first saw it: not a run
                "last_run_at": _epoch(entry.last_run_at) if entry.total_run_count else None,
                "next_run_at": next_run, "runs": entry.total_run_count,
            })
        return described

    def _publish_schedule(self) -> None:
        # Never lets an error out: showing the schedule must not stop beat from running it.
        try:
            entries = self.describe_schedule()
            now = time.monotonic()
            if entries == self._published_entries and now - self._published_at < SCHEDULE_REFRESH:
                return
            value = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "at": time.time(),
                                "max_interval": self.max_interval, "entries": entries}, default=str)
            self._broker().set(BEAT_SCHEDULE_KEY, value, ex=self._heartbeat_ttl())
        except Exception as error:  # the broker restarting: again at the next tick, said once
            if self._published_entries is not None or not self._publish_failed:
                log.warning("could not publish beat's schedule (trying at every tick): %s", error)
            self._published_entries, self._publish_failed = None, True
            self._close_heartbeat()
            return
        self._published_entries, self._published_at, self._publish_failed = entries, now, False

    def _start_sampler(self) -> None:
        if self._sampler is not None:
            return
        self._sampler = False  # tried once, whatever happens
        context = getattr(self.app, "dify", None)  # a plain Celery app (Celery's own CLI on another app): none
        interval = context.settings.DIFY_LOCAL_QUEUE_SAMPLE_INTERVAL if context is not None else 0
        if not interval:
            return
        from runner.monitor.sampler import QueueSampler

        try:
            sampler = QueueSampler(self.app, context.database, interval, QUEUE_NAMES)
            sampler.start()
        except Exception as error:  # no samples is no reason to stop running the schedule
            log.warning("could not start sampling the queues: %s", error)
            return
        self._sampler = sampler

    def _close_heartbeat(self) -> None:
        if self._heartbeat_connection is not None:
            try:
                self._heartbeat_connection.release()
            except Exception:
                pass
            self._heartbeat_connection = None

    def close(self):
        if self._sampler:
            self._sampler.stop()
        self._forget_instance()
        self._close_heartbeat()
        super().close()
