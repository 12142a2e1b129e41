"""MODE=beat: Celery beat with Dify's periodic tasks, schedule kept in the state folder."""

from __future__ import annotations

from celery.signals import beat_init, setup_logging

from runner.reload import child
from runner.roles.common import RoleStartError, celery_for_role, start_role
from runner.settings import Settings
from runner.state_access import StateFolderBusy, StateFolderRefused, beat_lock


def serve_beat(settings: Settings) -> None:
    paths = start_role(settings, "beat")
    setup_logging.connect(lambda **_: None, weak=False)  # ours is configured; keep Celery's off
    # Beat sends its entries by name (Celery's scheduler falls back to send_task for a task it has
    # not registered), so it leaves the task modules out: editing one does not restart it.
    celery, recorder = celery_for_role(settings, register_tasks=False, wait_out_refused_writes=True)
    child.loaded()  # taking over, this waits until the beat it replaces has saved its schedule and stopped
    lock = beat_lock(paths.root)  # held until this process ends: one beat per state folder
    try:
        lock.acquire()
    except (StateFolderBusy, StateFolderRefused) as error:
        raise RoleStartError(str(error)) from None
    beat_init.connect(lambda **_: child.serving(), weak=False)
    try:
        celery.Beat(
            scheduler="runner.beat_scheduler:HeartbeatScheduler",
            loglevel=settings.LOG_LEVEL,
            max_interval=settings.CELERY_BEAT_SCHEDULER_TIME,
        ).run()
    finally:
        recorder.stop()
