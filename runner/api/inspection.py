"""The workers' answers to Celery's inspect, shared by the API's requests.

Each round ends once the workers bound on the broker have all answered (runner.monitor.workers). A
dashboard refreshing every few seconds, in several tabs, asking `active_queues` for the queues and
again for the workers, would still ask the same thing many times over: here each method is asked
at most once per FRESH seconds, a request arriving while it is being asked waits for that answer,
and the methods one request needs are asked together (a refresh costs at most one timeout, not four).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from runner.monitor.workers import DEFAULT_TIMEOUT, INSPECT_METHODS, inspect

FRESH = 1.5  # seconds an answer is reused


class WorkerInspections:
    def __init__(self, app, timeout: float = DEFAULT_TIMEOUT, fresh: float = FRESH):
        self.app = app
        self.timeout = timeout
        self.fresh = fresh
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._asking: dict[str, Future] = {}
        self._answers: dict[str, tuple[float, dict[str, Any]]] = {}

    def ask(self, *methods: str) -> dict[str, dict[str, Any]]:
        """{method: {worker: its answer}} for each method; raises what the broker raised."""
        futures: dict[str, Future] = {}
        with self._lock:
            if self._executor is None:  # its threads start with the first question, not with the app
                self._executor = ThreadPoolExecutor(len(INSPECT_METHODS), thread_name_prefix="inspect")
            for method in methods:
                answered = self._answers.get(method)
                if answered is not None and time.monotonic() - answered[0] < self.fresh:
                    futures[method] = Future()
                    futures[method].set_result(answered[1])
                elif method in self._asking:
                    futures[method] = self._asking[method]
                else:
                    futures[method] = self._asking[method] = self._executor.submit(self._ask, method)
        return {method: future.result() for method, future in futures.items()}

    def _ask(self, method: str) -> dict[str, Any]:
        try:
            answer = inspect(self.app, method, self.timeout)
            with self._lock:
                self._answers[method] = (time.monotonic(), answer)
            return answer
        finally:
            with self._lock:
                self._asking.pop(method, None)
