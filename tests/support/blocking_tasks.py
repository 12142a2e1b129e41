"""A task the monitoring tests hold running (`serve worker -I tests.support.blocking_tasks`): it
waits until the test creates a file, so `inspect active` sees it for as long as the test needs."""

from __future__ import annotations

import time
from pathlib import Path

from celery import shared_task

LIMIT = 300.0  # seconds; a test that dies without releasing it must not keep a worker busy forever


@shared_task(name="tests.block")
def block(release: str, label: str = "") -> str:
    """Wait until the file `release` exists (at most LIMIT seconds), then return `label`."""
    deadline = time.monotonic() + LIMIT
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return label
