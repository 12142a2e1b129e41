"""Dify's periodic tasks: each with the flag that turns it on and when it runs; and dify-local's own
housekeeping, always on.

The queue each one lands on is its route in the topology; the on/off defaults are the flags'
defaults in the settings table, as the seed gives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

from runner.topology import ROUTES


def crontab(**fields: str) -> Any:
    """Celery's crontab, imported when a schedule is built: listing the periodic tasks (the
    supervisor, `topology`) should not load Celery."""
    from celery.schedules import crontab as celery_crontab

    return celery_crontab(**fields)


class _SettingsView(dict):
    def __init__(self, settings: Any):
        super().__init__()
        self.settings = settings

    def __missing__(self, name: str) -> Any:
        return getattr(self.settings, name)


@dataclass(frozen=True)
class PeriodicTask:
    task: str
    flag: str | None  # the ENABLE_* setting that turns it on; None: always on (dify-local's housekeeping)
    when: Callable[[Any], Any]  # settings -> a Celery schedule
    description: str  # may name settings in braces: "every {QUEUE_MONITOR_INTERVAL} minutes"

    def describe(self, settings: Any) -> str:
        return self.description.format_map(_SettingsView(settings))

    @property
    def queue(self) -> str:
        return ROUTES[self.task]

    def enabled(self, settings: Any) -> bool:
        return self.flag is None or bool(getattr(settings, self.flag))


PERIODIC_TASKS: tuple[PeriodicTask, ...] = (
    PeriodicTask("clean_embedding_cache_task", "ENABLE_CLEAN_EMBEDDING_CACHE_TASK",
                 lambda s: crontab(minute="0", hour="2"), "daily at 02:00"),
    PeriodicTask("clean_unused_datasets_task", "ENABLE_CLEAN_UNUSED_DATASETS_TASK",
                 lambda s: crontab(minute="0", hour="3"), "daily at 03:00"),
    PeriodicTask("create_tidb_serverless_task", "ENABLE_CREATE_TIDB_SERVERLESS_TASK",
                 lambda s: crontab(minute="0", hour="*"), "hourly"),
    PeriodicTask("update_tidb_serverless_status_task", "ENABLE_UPDATE_TIDB_SERVERLESS_STATUS_TASK",
                 lambda s: timedelta(minutes=10), "every 10 minutes"),
    PeriodicTask("clean_messages", "ENABLE_CLEAN_MESSAGES",
                 lambda s: crontab(minute="0", hour="4"), "daily at 04:00"),
    PeriodicTask("mail_clean_document_notify_task", "ENABLE_MAIL_CLEAN_DOCUMENT_NOTIFY_TASK",
                 lambda s: crontab(minute="0", hour="10", day_of_week="1"), "Mondays at 10:00"),
    PeriodicTask("datasets_queue_monitor", "ENABLE_DATASETS_QUEUE_MONITOR",
                 lambda s: timedelta(minutes=s.QUEUE_MONITOR_INTERVAL), "every {QUEUE_MONITOR_INTERVAL} minutes"),
    PeriodicTask("check_upgradable_plugin_task", "ENABLE_CHECK_UPGRADABLE_PLUGIN_TASK",
                 lambda s: crontab(minute="*/15"), "every 15 minutes"),
    PeriodicTask("workflow_schedule_poller_task", "ENABLE_WORKFLOW_SCHEDULE_POLLER_TASK",
                 lambda s: timedelta(minutes=s.WORKFLOW_SCHEDULE_POLLER_INTERVAL),
                 "every {WORKFLOW_SCHEDULE_POLLER_INTERVAL} minute(s)"),
)

# Not Dify's: what the local stack needs to keep itself tidy. Each runs an interval after beat first
# started (Celery's rule for a new entry), so a short-lived stack never runs it.
HOUSEKEEPING_TASKS: tuple[PeriodicTask, ...] = (
    PeriodicTask("clean_queue_samples_task", None, lambda s: timedelta(hours=1), "hourly"),
)

BY_TASK: dict[str, PeriodicTask] = {periodic.task: periodic for periodic in PERIODIC_TASKS + HOUSEKEEPING_TASKS}


def enabled(settings: Any) -> list[PeriodicTask]:
    return [periodic for periodic in PERIODIC_TASKS + HOUSEKEEPING_TASKS if periodic.enabled(settings)]


def build_beat_schedule(settings: Any) -> dict[str, dict[str, Any]]:
    """Celery's beat_schedule for the periodic tasks whose flag is on."""
    return {p.task: {"task": p.task, "schedule": p.when(settings)} for p in enabled(settings)}
