"""Logging for every role: one format, LOG_LEVEL, and LOG_FILE rotated by size."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from runner.log_handlers import RotatingLogFile
from runner.process_env import SUPERVISED


def supervised() -> bool:
    return os.environ.get(SUPERVISED) == "1"


def configure_logging(settings, role: str) -> None:
    """Log to standard output; also to LOG_FILE when this process is not under `up` (whose
    supervisor collects every process's lines into LOG_FILE itself)."""
    if supervised():
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s"
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if settings.LOG_FILE and not supervised():
        path = Path(settings.LOG_FILE).expanduser()
        if not path.is_absolute():
            path = settings.project_dir / path
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(RotatingLogFile(
            path, maxBytes=settings.LOG_FILE_MAX_SIZE * 1024 * 1024,
            backupCount=settings.LOG_FILE_BACKUP_COUNT, encoding="utf-8"))
    formatter = logging.Formatter(fmt, datefmt="%H:%M:%S")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(settings.LOG_LEVEL)
    # Connection chatter of the HTTP server and the broker client is noise at INFO.
    logging.getLogger("waitress").setLevel(max(logging.WARNING, root.level))
    # "Task queue depth is N": requests waiting for one of the SERVER_WORKER_CONNECTIONS threads, as
    # expected under load; shown at DEBUG
    logging.getLogger("waitress.queue").setLevel(logging.DEBUG if root.level <= logging.DEBUG else logging.ERROR)
