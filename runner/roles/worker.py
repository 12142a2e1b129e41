"""MODE=worker: a Celery worker on the configured queues, served in priority order."""

from __future__ import annotations

import importlib

from celery.signals import setup_logging, worker_ready

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


def serve_worker(settings: Settings, hostname: str | None = None, include: tuple[str, ...] = ()) -> None:
    start_role(settings, "worker")
    setup_logging.connect(lambda **_: None, weak=False)  # ours is configured; keep Celery's off
    celery, recorder = celery_for_role(settings)
    for module in include:  # extra task modules (a project's own, or a benchmark's)
        importlib.import_module(module)
    child.loaded()
    worker_ready.connect(lambda **_: child.serving(), weak=False)
    argv = worker_argv(settings, hostname or f"{process_name('worker')}@%h")
    if child.taking_over():
        argv.insert(0, "--quiet")  # the banner was shown when the stack started; a reload says so in one line
    try:
        celery.worker_main(argv)
    finally:
        recorder.stop()
