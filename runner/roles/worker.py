"""MODE=worker: a Celery worker on the configured queues, served in priority order."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading

from celery.signals import setup_logging, worker_ready, worker_shutting_down

from runner import topology
from runner.reload import child
from runner.roles.common import celery_for_role, process_name, start_role
from runner.settings import Settings


def worker_argv(settings: Settings, hostname: str) -> list[str]:
    """Celery worker arguments from settings (which already hold -Q/-P/-c given on the command line)."""
    argv = [
        "worker",
        "--pool", settings.CELERY_WORKER_CLASS,
        "--queues", ",".join(topology.consumption_order(settings.CELERY_QUEUES)),
        "--hostname", hostname,
        "--loglevel", settings.LOG_LEVEL,
        "--prefetch-multiplier", str(settings.CELERY_WORKER_PREFETCH_MULTIPLIER),
        # Mingle asks the other workers for their revoked tasks and clocks, waiting a second for
        # answers; gossip follows their events. A local stack gains nothing from either, and the
        # second is a third of the worker's start-up. Revokes still reach every running worker.
        "--without-mingle", "--without-gossip",
    ]
    if settings.autoscale:
        ceiling, floor = settings.autoscale
        argv.append(f"--autoscale={ceiling},{floor}")
    else:
        argv += ["--concurrency", str(settings.CELERY_WORKER_AMOUNT)]
    return argv


class PromptShutdown:
    """Celery acts on a warm shutdown at its event loop's next turn, which can be a second after the
    signal: its handler runs in the main thread, blocked in the loop's poll while the kernel hands
    the signal to any thread. A task arriving meanwhile still starts here, and when a reload's
    successor is consuming already, it would run the old code. Python's wakeup fd, written by the
    signal's C handler in whichever thread gets it, is put in the event loop: the poll returns at
    once, Celery's handler runs, and the loop's next turn begins the shutdown."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        worker_ready.connect(self._attach, weak=False)

    def _attach(self, sender=None, **_) -> None:
        hub = getattr(sender, "hub", None)  # the consumer's event loop (none with the solo pool)
        if hub is None or threading.current_thread() is not threading.main_thread():
            return
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        hub.add_reader(self.read_fd, self._drain)

    def _drain(self, *_) -> None:
        try:
            while os.read(self.read_fd, 512):
                pass
        except BlockingIOError:
            pass


def _quiet_requeues(**_) -> None:
    """Stopping, this worker hands back to its queue a message its last BRPOP had already taken;
    kombu warns about each ("Requeuing undeliverable message … No consumers"), which on a reload
    reads like trouble when it is the designed path."""
    logging.getLogger("kombu.transport.virtual.base").setLevel(logging.ERROR)


def serve_worker(settings: Settings, hostname: str | None = None, include: tuple[str, ...] = ()) -> None:
    start_role(settings, "worker")
    setup_logging.connect(lambda **_: None, weak=False)  # ours is configured; keep Celery's off
    celery, recorder = celery_for_role(settings, wait_out_refused_writes=True)
    for module in include:  # extra task modules (a project's own, or a benchmark's)
        importlib.import_module(module)
    child.loaded()
    PromptShutdown()
    worker_shutting_down.connect(_quiet_requeues, weak=False)
    worker_ready.connect(lambda **_: child.serving(), weak=False)
    argv = worker_argv(settings, hostname or f"{process_name('worker')}@%h")
    if child.taking_over():
        argv.insert(0, "--quiet")  # the banner was shown when the stack started; a reload says so in one line
    try:
        celery.worker_main(argv)
    finally:
        recorder.stop()
