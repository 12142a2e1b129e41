"""Result backends for processes that poll results by key and never wait on them (the API).

Celery's Redis backend subscribes to a task's result channel whenever a process sends that task,
so that `result.get()` can wait on pub/sub. A process that only polls never reads those messages:
the subscriptions pile up for as long as it runs, and while the broker is down every send spends
~20 s retrying the subscription before failing with a RuntimeError instead of a broker error.
"""

from __future__ import annotations

from celery.backends.redis import RedisBackend, SentinelBackend


class PollingRedisBackend(RedisBackend):
    def on_task_call(self, producer, task_id):
        return None


class PollingSentinelBackend(SentinelBackend):
    def on_task_call(self, producer, task_id):
        return None


def polling_backend_url(url: str) -> str:
    """The result backend URL naming the polling class for `url`'s scheme."""
    cls = "PollingSentinelBackend" if url.startswith("sentinel://") else "PollingRedisBackend"
    return f"runner.results:{cls}+{url}"
