"""Every queue's depth (and its oldest message's age) written to queue_samples every few seconds,
for the dashboard's charts: a daemon thread owned by beat's scheduler.

One writer: beat is the one process of a deployment that runs it, the scheduler starts it at its
first tick and stops it (joined) when it closes. A reloaded beat ticks only after the beat it replaces
has exited (`up` stops beat first, runner.supervisor.reloads), so the two never sample together.
Should two beats overlap anyway (two `celery beat` by hand), samples are taken on a grid of the
interval (12:00:00, 12:00:05, …) and keyed by (queue, time): both write the same rows, not twice
as many.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Iterable

from runner.monitor.queues import QueueDepth, queue_states
from runner.store.queue_samples import record_samples

log = logging.getLogger("dify_local.beat")


def next_grid_point(now: float, interval: float) -> float:
    """The first multiple of `interval` (in UNIX time) after `now`."""
    return (math.floor(now / interval) + 1) * interval


class QueueSampler:
    def __init__(self, app, database, interval: float, queues: Iterable[str]):
        self.app = app
        self.database = database
        self.interval = interval
        self.queues = tuple(queues)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        if self._thread is None and self.interval > 0:
            self._thread = threading.Thread(target=self._run, name="queue-sampler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def sample(self, at: float | None = None) -> list[QueueDepth]:
        """Read every queue now and record it as sampled `at` (default: now)."""
        states = list(queue_states(self.app, self.queues).values())
        record_samples(self.database, states, at)
        return states

    def _run(self) -> None:
        while True:
            at = next_grid_point(time.time(), self.interval)
            if self._stop.wait(max(0.0, at - time.time())):
                return
            try:
                self.sample(at)
            except Exception as error:  # the broker restarting, the database busy: try at the next point
                if not self._failing:
                    log.warning("could not sample the queues' depths (trying again every %s s): %s",
                                self.interval, error)
                self._failing = True
            else:
                if self._failing:
                    log.info("sampling the queues' depths again")
                self._failing = False
