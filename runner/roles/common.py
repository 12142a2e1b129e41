"""What every role does before serving: logging, the state folder, the database, the Celery app."""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

from celery import Celery

from runner.celery_app import create_celery_app
from runner.logs import configure_logging
from runner.recording import install_task_recording
from runner.settings import Settings
from runner.state import StatePaths
from runner.store import prepare_database
from runner.store.task_runs import TaskRunRecorder

PROCESS_NAME_VARIABLE = "DIFY_LOCAL_PROCESS_NAME"  # set by `up` to the Procfile name (worker, worker.2, …)


def process_name(default: str) -> str:
    return os.environ.get(PROCESS_NAME_VARIABLE) or default


def start_role(settings: Settings, role: str) -> StatePaths:
    configure_logging(settings, role)
    return StatePaths(settings.state_dir).ensure()


def celery_for_role(settings: Settings, poll_results: bool = False) -> tuple[Celery, TaskRunRecorder]:
    """The Celery app with its metadata store migrated (or checked) and task recording on."""
    app = create_celery_app(settings, poll_results)
    prepare_database(app.dify.database, migrate=settings.MIGRATION_ENABLED)
    return app, install_task_recording(app)


def stop_on_signals(stop: Callable[[], None]) -> None:
    """Run `stop` (from a helper thread, as servers' shutdown must be) on SIGTERM or SIGINT."""
    def handler(signum, frame):
        threading.Thread(target=stop, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
