"""Result backends: for processes that poll results by key and never wait on them (the API), and
for those that wait out a broker refusing writes (the worker, beat: runner.write_refusal).

Celery's Redis backend subscribes to a task's result channel whenever a process sends that task,
so that `result.get()` can wait on pub/sub. A process that only polls never reads those messages:
the subscriptions pile up for as long as it runs, and while the broker is down every send spends
~20 s retrying the subscription before failing with a RuntimeError instead of a broker error.
"""

from __future__ import annotations

from celery.backends.redis import RedisBackend, SentinelBackend

from runner.write_refusal import WaitingRedis


class PollingRedisBackend(RedisBackend):
    def on_task_call(self, producer, task_id):
        return None


class PollingSentinelBackend(SentinelBackend):
    def on_task_call(self, producer, task_id):
        return None


class WaitingRedisBackend(RedisBackend):
    def _get_client(self):
        return WaitingRedis


class WaitingSentinelBackend(SentinelBackend):
    def _get_client(self):
        return WaitingRedis


def polling_backend_url(url: str) -> str:
    """The result backend URL naming the polling class for `url`'s scheme."""
    cls = "PollingSentinelBackend" if url.startswith("sentinel://") else "PollingRedisBackend"
    return f"runner.results:{cls}+{url}"


def waiting_backend_url(url: str) -> str:
    """The result backend URL naming the class that waits out refused writes, for `url`'s scheme."""
    cls = "WaitingSentinelBackend" if url.startswith("sentinel://") else "WaitingRedisBackend"
    return f"runner.results:{cls}+{url}"
