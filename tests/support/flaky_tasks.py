"""A task the failure-handling tests run in a real worker (`serve worker -I tests.support.flaky_tasks`):
it fails until a flag file exists, retrying with backoff as the project's tasks do (shorter here)."""

from __future__ import annotations

from pathlib import Path

from celery import shared_task


@shared_task(name="tests.flaky", bind=True, autoretry_for=(Exception,), retry_backoff=1, retry_jitter=False,
             max_retries=2)
def flaky(self, flag: str) -> str:
    """Fail (a transient-looking error) until `flag` exists, then return its text."""
    path = Path(flag)
    if not path.exists():
        raise RuntimeError(f"the flag {flag} is not there yet (attempt {self.request.retries + 1})")
    return path.read_text()
