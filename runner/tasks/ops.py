"""Operations (queue ops_trace): traces, the embedding cache upkeep, the dataset queue monitor."""

from __future__ import annotations

import json
import time

from runner.monitor.queues import queue_depths
from runner.tasks.base import context, delete_older_than, new_id, now, task
from runner.tasks.mail import send_queue_alert_mail_task

MONITORED_QUEUE = "dataset"


@task("process_trace_tasks")
def process_trace_tasks(self, app_id: str, name: str, data: dict) -> dict:
    """Record one trace of an app's run."""
    trace_id = new_id()
    with context(self).database.transaction() as db:
        db["traces"].insert({"id": trace_id, "app_id": app_id, "name": name,
                             "data": json.dumps(data, ensure_ascii=False), "created_at": now()})
    return {"trace_id": trace_id, "app_id": app_id, "name": name}


@task("clean_embedding_cache_task")
def clean_embedding_cache_task(self, days: int = 7) -> dict:
    """Drop cached embeddings older than `days` days."""
    return delete_older_than(context(self), "embedding_cache", "created_at", days)


@task("datasets_queue_monitor")
def datasets_queue_monitor(self) -> dict:
    """Mail QUEUE_MONITOR_ALERT_EMAILS when the dataset queue holds more than the threshold."""
    settings = context(self).settings
    depth = queue_depths(self.app, [MONITORED_QUEUE])[MONITORED_QUEUE]  # priority sub-lists included
    threshold = settings.QUEUE_MONITOR_THRESHOLD
    alerted: list[str] = []
    if depth > threshold:
        checked_at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        for address in settings.QUEUE_MONITOR_ALERT_EMAILS:
            send_queue_alert_mail_task.delay(address, MONITORED_QUEUE, depth, threshold, checked_at)
            alerted.append(address)
    return {"queue": MONITORED_QUEUE, "depth": depth, "threshold": threshold, "alerted": alerted}
