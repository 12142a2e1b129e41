"""Record task runs in SQLite from Celery's signals: sent, started, failed, finished."""

from __future__ import annotations

from celery import Celery
from celery.signals import (
    after_task_publish,
    task_failure,
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from runner.run_settler import install_run_settler
from runner.store.task_runs import TaskRunRecorder

_installed: dict[int, TaskRunRecorder] = {}


def install_task_recording(app: Celery) -> TaskRunRecorder:
    """Connect the signals of this process to a recorder writing to the app's metadata store."""
    if id(app) in _installed:
        return _installed[id(app)]
    recorder = TaskRunRecorder(app.dify.database)
    _installed[id(app)] = recorder

    def sent(sender=None, headers=None, body=None, routing_key=None, **_):
        if headers and "id" in headers and isinstance(body, (list, tuple)) and len(body) >= 2:
            recorder.queued(headers["id"], headers.get("task") or sender, routing_key, body[0], body[1])

    def started(sender=None, task_id=None, task=None, args=None, kwargs=None, **_):
        request = task.request
        queue = (request.delivery_info or {}).get("routing_key")
        recorder.started(task_id, task.name, queue, args, kwargs, request.hostname)

    def failed(sender=None, task_id=None, exception=None, **_):
        recorder.failed(task_id, sender.name, f"{type(exception).__name__}: {exception}")

    def finished(sender=None, task_id=None, task=None, state=None, **_):
        recorder.finished(task_id, task.name, state or "SUCCESS")

    def shutdown(**_):
        recorder.stop()

    def forked(**_):  # a prefork pool child: tasks run here, with their own writer and connections
        app.dify.database.forget_after_fork()
        recorder.forget_after_fork()

    install_run_settler(app)  # a worker settles the rows a killed worker's recorder left behind
    after_task_publish.connect(sent, weak=False)
    task_prerun.connect(started, weak=False)
    task_failure.connect(failed, weak=False)
    task_postrun.connect(finished, weak=False)
    worker_shutdown.connect(shutdown, weak=False)
    worker_process_init.connect(forked, weak=False)
    worker_process_shutdown.connect(shutdown, weak=False)
    return recorder
