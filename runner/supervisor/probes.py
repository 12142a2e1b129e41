"""Readiness probes: a real check per role, never a sleep.

broker: answers PING after AUTH · api: /health/api answers 200 · worker (ours or any Celery
worker): answers a Celery ping under its node name, from this process or one of its children ·
our beat: has written a heartbeat since it started · Celery's own beat: has written its schedule
since it started (what it does just before its first tick), or logged "beat: Starting..." · a web
process of another project: its port answers HTTP · a configured probe (http, tcp, a log line) ·
anything else: stayed up a short while.

The worker ping and the beat heartbeat go through kombu alone (Celery's ping is a kombu pidbox
broadcast), so the supervisor keeps Celery out of its memory.
"""

from __future__ import annotations

import http.client
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
from runner.supervisor.foreign_readiness import (
    BEAT_BANNER,
    BEAT_STARTING,
    Address,
    beat_schedule,
    web_address,
)
from runner.supervisor.process import ManagedProcess
from runner.supervisor.tree import descendants
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
        answers = self.answers(node, "stats")
        return answers[0] if answers else None

    def queues(self, node: str) -> list[str] | None:
        """The queues a worker says it consumes (what `celery inspect active_queues` asks)."""
        answers = self.answers(node, "active_queues")
        if not answers or not isinstance(answers[0], list):
            return None
        return [queue["name"] for queue in answers[0]
                if isinstance(queue, dict) and isinstance(queue.get("name"), str)]

    def answers(self, node: str, method: str, limit: int | None = 1, timeout: float = 1.0) -> list:
        """What the workers named `node` answer (the first only, or all within `timeout`)."""
        with self._lock:
            try:
                self._connect()
                replies = self._mailbox._broadcast(method, {}, [node], reply=True, timeout=timeout, limit=limit)
            except Exception:
                self._reset()
                return []
        return [reply[node] for reply in replies or [] if isinstance(reply, dict) and node in reply]

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
    def probe(process: ManagedProcess) -> bool:
        node = process.spec.node_name()
        if not link.ping(node):
            return False
        # The node answering must be this process (or its child, behind `uv run`), not another
        # worker of the same name on the broker (one that was started by hand, another checkout's).
        ours = {process.pid} | {child.pid for child in descendants(process.pid)}
        answers = link.answers(node, "stats")
        pids = [answer.get("pid") for answer in answers if isinstance(answer, dict)]
        if not pids or not all(isinstance(pid, int) for pid in pids):
            return bool(answers)  # a worker that gives no pid: its ping counts
        if ours & set(pids):
            return True
        # another worker of that name answered first: hear them all
        answers = link.answers(node, "stats", limit=None, timeout=2 * PING_TIMEOUT)
        return any(isinstance(answer, dict) and answer.get("pid") in ours for answer in answers)
    return probe


def beat_probe(link: BrokerLink) -> Probe:
    def probe(process: ManagedProcess) -> bool:
        heartbeat = link.heartbeat()
        return bool(heartbeat) and heartbeat["at"] >= process.started_wall - 1 and heartbeat["pid"] == process.pid
    return probe


def web_probe(address: Address) -> Probe:
    """Any HTTP answer (a 404 too): the server has loaded the app and serves."""
    def probe(process: ManagedProcess) -> bool:
        connection = http.client.HTTPConnection(address.host, address.port, timeout=2)
        try:
            connection.request("GET", "/", headers={"User-Agent": "dify-local readiness probe"})
            connection.getresponse().read(0)
            return True
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()
    return probe


def celery_beat_probe(process: ManagedProcess) -> Probe:
    """Celery's own beat: its PersistentScheduler writes the schedule file as it sets up, right
    before the loop's first tick (the one mark it leaves outside its code: beat logs at WARNING by
    default, so "beat: Starting..." is often not printed). With another scheduler (-S), or a
    schedule file the app names itself: that log line, or its banner and SETTLE_SECONDS more."""
    schedule = beat_schedule(process.spec.argv, process.cwd, process.env)
    banner_at: list[float] = []

    def probe(p: ManagedProcess) -> bool:
        for path in schedule.files:
            try:
                if path.stat().st_mtime >= p.started_wall:
                    return True
            except OSError:
                continue
        lines = list(p.tail)
        if any(BEAT_STARTING in line for line in lines):
            return True
        if not banner_at and any(BEAT_BANNER in line for line in lines):
            banner_at.append(time.monotonic())
        return bool(banner_at) and time.monotonic() - banner_at[0] >= SETTLE_SECONDS
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
    if role == "beat":
        return beat_probe(link) if process.spec.is_ours else celery_beat_probe(process)
    if role is None and not process.spec.is_ours:
        address = web_address(process.spec.argv, process.env)
        if address is not None:
            return web_probe(address)
    return settle_probe
