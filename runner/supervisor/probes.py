"""Readiness probes: a real check per role, never a sleep.

broker: answers PING after AUTH · api: /health answers 200 · worker: answers a Celery ping ·
beat: has written a heartbeat since it started · anything else: stayed up a short while.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from typing import Callable

import redis

from runner.settings import Settings
from runner.supervisor.process import ManagedProcess

Probe = Callable[[ManagedProcess], bool]
SETTLE_SECONDS = 1.5  # a process of another project is ready once it has stayed up this long


class BrokerClients:
    """A Celery app and a Redis client for the probes, made on first use (so a stack without a
    worker or beat never imports Celery into the supervisor)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._celery = None

    @property
    def celery(self):
        with self._lock:
            if self._celery is None:
                from runner.celery_app import create_celery_app

                self._celery = create_celery_app(self.settings)
            return self._celery

    def close(self) -> None:
        if self._celery is not None:
            self._celery.close()


def broker_probe(settings: Settings) -> Probe:
    def probe(process: ManagedProcess) -> bool:
        client = redis.Redis(host=settings.REDIS_HOST, port=settings.REDIS_PORT, password=settings.REDIS_PASSWORD,
                             socket_timeout=1, socket_connect_timeout=1, protocol=2)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()
    return probe


def api_probe(settings: Settings) -> Probe:
    url = f"{settings.api_url}/health"

    def probe(process: ManagedProcess) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False
    return probe


def worker_probe(clients: BrokerClients) -> Probe:
    def probe(process: ManagedProcess) -> bool:
        node = process.spec.node_name()
        try:
            replies = clients.celery.control.ping(destination=[node], timeout=1.0)
        except Exception:
            return False
        return any(node in reply for reply in replies)
    return probe


def beat_probe(clients: BrokerClients) -> Probe:
    from runner.beat_scheduler import read_heartbeat

    def probe(process: ManagedProcess) -> bool:
        try:
            with clients.celery.connection_for_read() as connection:
                heartbeat = read_heartbeat(connection.default_channel.client)
        except Exception:
            return False
        return bool(heartbeat) and heartbeat["at"] >= process.started_wall - 1 and heartbeat["pid"] == process.pid
    return probe


def settle_probe(process: ManagedProcess) -> bool:
    return process.running() and time.monotonic() - process.started_at >= SETTLE_SECONDS


def probe_for(role: str | None, settings: Settings, clients: BrokerClients) -> Probe:
    if role == "broker":
        return broker_probe(settings)
    if role == "api":
        return api_probe(settings)
    if role == "worker":
        return worker_probe(clients)
    if role == "beat":
        return beat_probe(clients)
    return settle_probe
