"""Tasks the supervisor tests run in a real worker (`serve worker -I tests.support.slow_tasks`):
they take a while, and they leave a trace of every run in a folder, so a test can count runs."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from celery import shared_task


def _trace(folder: str, label: str) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{label}.{uuid.uuid4().hex}").write_text(str(os.getpid()))


@shared_task(name="tests.sleep")
def sleep(seconds: float, folder: str, label: str) -> str:
    """Sleep, then record that this run finished (one file per finished run)."""
    time.sleep(seconds)
    _trace(folder, label)
    return label
