"""The Celery app factory: one function turns settings into a configured app."""

from __future__ import annotations

import importlib
from typing import Any

from celery import Celery
from celery.signals import before_task_publish
from kombu import Queue

from runner import broker_transport, topology, write_refusal
from runner.beat_schedule import build_beat_schedule
from runner.broker_config import CONSUMER_OPTIONS, ssl_options, transport_options
from runner.context import AppContext
from runner.monitor.queues import stamp_sent_at
from runner.results import polling_backend_url, waiting_backend_url
from runner.settings import Settings
from runner.state import StatePaths
from runner.tasks import TASK_MODULES
from runner.worker_heartbeat import WorkerHeartbeat


def soft_time_limit(hard: int) -> float:
    """A tenth before the hard limit, at most 30 s before it."""
    return hard - min(30, hard / 10)


# Seconds the API waits for the broker to confirm a send. A broker whose disk just filled holds the
# reply to the write it could not log until it can (runner.broker.server); the API says so instead.
SEND_TIMEOUT = 5.0


def _result_backend(settings: Settings, poll_results: bool, wait_out_refused_writes: bool) -> str:
    if poll_results:
        return polling_backend_url(settings.result_backend_url)
    if wait_out_refused_writes:
        return waiting_backend_url(settings.result_backend_url)
    return settings.result_backend_url


def celery_config(settings: Settings, poll_results: bool = False,
                  wait_out_refused_writes: bool = False) -> dict[str, Any]:
    paths = StatePaths(settings.state_dir)
    transport = transport_options(settings)
    if poll_results:
        transport["socket_timeout"] = SEND_TIMEOUT
    tls = ssl_options(settings)
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "result_backend": _result_backend(settings, poll_results, wait_out_refused_writes),
        "broker_transport_options": transport,
        "result_backend_transport_options": {k: v for k, v in transport.items() if k not in CONSUMER_OPTIONS},
        "broker_connection_retry_on_startup": True,
        # JSON only: a pickled message is refused by the worker, a pickled result by the client.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": settings.CELERY_RESULT_EXPIRES,
        "task_queues": [Queue(name, routing_key=name) for name in topology.QUEUE_NAMES],
        "task_routes": {task: {"queue": queue} for task, queue in topology.ROUTES.items()},
        # A task's message is acknowledged when it finishes, not when it starts: a task still running
        # when its worker is stopped for good (cold shutdown, reload, crash) goes back to its queue
        # instead of being lost. Tasks may therefore run again after a hard stop.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Enforced by the prefork and gevent pools only: the threads and solo pools cannot stop a
        # running thread (celery.concurrency.thread ignores the limits). A task stopped by its hard
        # limit is a FAILURE and acked, not redelivered. The soft limit raises SoftTimeLimitExceeded
        # in the task a little before, so it can clean up.
        "task_time_limit": settings.DIFY_LOCAL_TASK_TIME_LIMIT,
        "task_soft_time_limit": soft_time_limit(settings.DIFY_LOCAL_TASK_TIME_LIMIT),
        "worker_pool": settings.CELERY_WORKER_CLASS,
        "worker_concurrency": settings.CELERY_WORKER_AMOUNT,
        "worker_prefetch_multiplier": settings.CELERY_WORKER_PREFETCH_MULTIPLIER,
        "beat_schedule": build_beat_schedule(settings),
        "beat_max_interval": settings.CELERY_BEAT_SCHEDULER_TIME,
        # Also under Celery's own `celery -A runner.app.celery beat`: the heartbeat shows it is alive.
        "beat_scheduler": "runner.beat_scheduler:HeartbeatScheduler",
        "beat_schedule_filename": str(paths.beat_schedule),
        "timezone": "UTC",
        "enable_utc": True,
    }
    if tls:
        config["broker_use_ssl"] = tls
        config["redis_backend_use_ssl"] = tls
    return config


def create_celery_app(settings: Settings, poll_results: bool = False, register_tasks: bool = True,
                      wait_out_refused_writes: bool = False) -> Celery:
    """A Celery app configured from `settings`, with every task module registered.

    `poll_results`: this process reads results by id and never waits on them (see runner.results).
    `register_tasks`: import the task modules. Only a process that runs tasks needs them; one that
    only sends (the API, beat) sends by name, routed by `task_routes`, and so does not restart when
    a task module changes.
    `wait_out_refused_writes`: while the broker refuses writes (MISCONF: its disk is full), wait
    and carry on when it takes them again (the worker, beat), rather than fail at once (the API,
    commands).
    """
    write_refusal.register()
    if wait_out_refused_writes:
        broker_transport.install()
    app = Celery("dify-local", set_as_current=True)
    app.conf.update(celery_config(settings, poll_results, wait_out_refused_writes))
    app.dify = AppContext(settings)
    # Here rather than in the worker role, so `celery -A runner.app.celery worker` beats as well.
    app.steps["consumer"].add(WorkerHeartbeat)
    if register_tasks:
        for module in TASK_MODULES:
            importlib.import_module(module)
    app.finalize(auto=True)
    before_task_publish.connect(stamp_sent_at, weak=False, dispatch_uid="dify-local-sent-at")
    return app
