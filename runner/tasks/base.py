"""What every task module shares: the task decorator and the per-process context."""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable

from celery import shared_task

from runner.context import AppContext
from runner.topology import ROUTES


def task(name: str, **options: Any) -> Callable:
    """A bound shared task named `name`; the name must have a route in the topology."""
    if name not in ROUTES:
        raise LookupError(f"task {name!r} has no route in runner/topology.py ROUTES")
    return shared_task(name=name, bind=True, **options)


def context(bound_task: Any) -> AppContext:
    return bound_task.app.dify


def new_id() -> str:
    return str(uuid.uuid4())


def now() -> float:
    return time.time()
