"""Readiness probes: a real check per role, never a sleep.

broker: answers PING after AUTH · api: /health/api answers 200 · worker: answers a Celery ping ·
beat: has written a heartbeat since it started · a configured probe (http, tcp, a log line) ·
anything else: stayed up a short while.

The worker ping and the beat heartbeat go through kombu alone (Celery's ping is a kombu pidbox
broadcast), so the supervisor keeps Celery out of its memory.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Callable
from urllib.parse import urlsplit

import redis

from runner.broker_config import BEAT_HEARTBEAT_KEY
from runner.settings import Settings
from runner.supervisor.process import ManagedProcess
from runner.write_refusal import refusal_in

Probe = Callable[[ManagedProcess], bool]
SETTLE_SECONDS = 1.5  # a process of another project is ready once it has stayed up this long
PING_TIMEOUT = 0.25  # a ready worker answers in milliseconds; this only bounds each try


class BrokerLink:
    """One kombu connection to the broker for the probes, opened on first use."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._connection = None
        self._mailbox = None

    def _connect(self):
        from kombu.pidbox import Mailbox

        from runner.broker_config import broker_connection

        if self._connection is None:
            self._connection = broker_connection(self.settings)
            # Celery's control mailbox: exchange "celery", fanout, JSON
            self._mailbox = Mailbox("celery", type="fanout", accept=["json"], serializer="json")(self._connection)
        return self._connection

    def ping(self, node: str) -> bool:
        with self._lock:
            try:
                self._connect()
                replies = self._mailbox._broadcast("ping", {}, [node], reply=True, timeout=PING_TIMEOUT, limit=1)
            except Exception:
                self._reset()
                return False
        return any(node in reply for reply in replies or [])

    def stats(self, node: str) -> dict | None:
        with self._lock:
            try:
                self._connect()
                replies = self._mailbox._broadcast("stats", {}, [node], reply=True, timeout=1.0, limit=1)
            except Exception:
                self._reset()
                return None
        for reply in replies or []:
            if node in reply:
                return reply[node]
        return None

    def heartbeat(self) -> dict | None:
        with self._lock:
            try:
                raw = self._connect().default_channel.client.get(BEAT_HEARTBEAT_KEY)
            except Exception:
                self._reset()
                return None
        return json.loads(raw) if raw else None

    def _reset(self) -> None:
        if self._connection is not None:
            try:
                self._connection.release()
            except Exception:
                pass
        self._connection = self._mailbox = None

    def close(self) -> None:
        with self._lock:
            self._reset()


def write_refusal_reason(settings: Settings) -> str | None:
    """Why the embedded broker refuses writes (MISCONF: its log cannot be written, a full disk), or
    None when it takes them (or does not answer in time: that is for its probe and its restarts)."""
    client = redis.Redis(host=settings.REDIS_HOST, port=settings.REDIS_PORT, password=settings.REDIS_PASSWORD,
                         socket_timeout=0.5, socket_connect_timeout=0.5, protocol=2)
    try:
        persistence = client.info("persistence")
    except redis.RedisError:
        return None
    finally:
        client.close()
    return refusal_in(persistence)


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


def http_probe(url: str) -> Probe:
    def probe(process: ManagedProcess) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return 200 <= response.status < 400
        except (urllib.error.URLError, OSError, ValueError):
            return False
    return probe


def tcp_probe(url: str) -> Probe:
    split = urlsplit(url)

    def probe(process: ManagedProcess) -> bool:
        try:
            with socket.create_connection((split.hostname, split.port), timeout=1):
                return True
        except OSError:
            return False
    return probe


def log_probe(pattern: str) -> Probe:
    regex = re.compile(pattern)

    def probe(process: ManagedProcess) -> bool:
        return any(regex.search(line) for line in list(process.tail))
    return probe


def worker_probe(link: BrokerLink) -> Probe:
    return lambda process: link.ping(process.spec.node_name())


def beat_probe(link: BrokerLink) -> Probe:
    def probe(process: ManagedProcess) -> bool:
        heartbeat = link.heartbeat()
        return bool(heartbeat) and heartbeat["at"] >= process.started_wall - 1 and heartbeat["pid"] == process.pid
    return probe


def settle_probe(process: ManagedProcess) -> bool:
    return process.running() and time.monotonic() - process.started_at >= SETTLE_SECONDS


def configured_probe(spec: str) -> Probe:
    if spec.startswith("log:"):
        return log_probe(spec[4:])
    if spec.startswith("tcp://"):
        return tcp_probe(spec)
    return http_probe(spec)


def probe_for(process: ManagedProcess, settings: Settings, link: BrokerLink) -> Probe:
    if process.options.ready:
        return configured_probe(process.options.ready)
    role = process.spec.role
    if role == "broker":
        return broker_probe(settings)
    if role == "api":
        return http_probe(f"{settings.api_url}/health/api")  # the API itself; /health is the whole stack
    if role == "worker":
        return worker_probe(link)
    if role == "beat" and process.spec.is_ours:  # our scheduler writes the heartbeat
        return beat_probe(link)
    return settle_probe
