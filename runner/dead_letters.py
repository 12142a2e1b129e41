"""Dead letters: every task failing for good is written to failed_tasks, from Celery's task_failure
signal. That signal fires once per task, when it gives up: a failure that autoretry turns into a
retry raises Retry instead, so only the last attempt (retries exhausted, or an error no retry
helps) lands here."""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import task_failure

from runner.store.failed_tasks import record_failure

log = logging.getLogger(__name__)

_installed: set[int] = set()


def install_dead_letters(app: Celery) -> None:
    if id(app) in _installed:
        return
    _installed.add(id(app))
    database = app.dify.database

    def failed(sender=None, task_id=None, exception=None, args=None, kwargs=None, einfo=None, **_):
        request = getattr(sender, "request", None)
        try:
            record_failure(
                database, task_id=task_id, name=getattr(sender, "name", str(sender)),
                queue=(getattr(request, "delivery_info", None) or {}).get("routing_key"),
                args=args, kwargs=kwargs, error=f"{type(exception).__name__}: {exception}",
                traceback=getattr(einfo, "traceback", None), retries=getattr(request, "retries", 0) or 0,
                worker=getattr(request, "hostname", None))
        except Exception:  # recording must never break the worker
            log.exception("could not record the failure of task %s (%s) in %s", task_id, sender, database.path)

    task_failure.connect(failed, weak=False)
