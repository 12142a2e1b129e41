"""Shared pieces of the benchmarks: a real redis-server, processes, timing a batch of tasks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out waiting for {what}")
        time.sleep(0.05)


def wait_for_ping(client, timeout: float, what: str) -> None:
    """Until the Redis-protocol server behind `client` (redis-py) answers PING."""
    import redis

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
    wait_for(answers, timeout, what)


@contextmanager
def redis_server(password: str | None = None, durable: bool = False):
    """A redis-server on a free loopback port, memory only, or (`durable`) with the append-only
    file fsynced every second, Redis' own `appendfsync everysec`."""
    binary = shutil.which("redis-server")
    if not binary:
        raise SystemExit("bench: needs Debian's redis-server (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        auth = ["--requirepass", password] if password else []
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if durable else ["--appendonly", "no"]
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 *persistence, "--dir", folder, *auth], stdout=subprocess.DEVNULL)
        try:
            import redis

            client = redis.Redis(port=port, password=password)
            wait_for_ping(client, 20, "redis-server")
            version = client.info()["redis_version"]
            yield f"redis://{':' + password + '@' if password else ''}127.0.0.1:{port}", version, client
        finally:
            proc.terminate()
            proc.wait(10)


def env(**extra: str) -> dict[str, str]:
    result = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "REDIS_", "DIFY_"))}
    result["PATH"] = f"{BIN}{os.pathsep}{result.get('PATH', '')}"
    result["PYTHONPATH"] = str(REPO)
    result.update(extra)
    return result


@contextmanager
def process(argv: list[str], cwd: Path, environment: dict[str, str]):
    proc = subprocess.Popen(argv, cwd=cwd, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def client_app(broker_url: str):
    from celery import Celery

    import bench.trivial  # noqa: F401  (registers bench.add)

    app = Celery("bench-client", broker=broker_url, backend=broker_url)
    app.conf.update(accept_content=["json"], broker_connection_retry_on_startup=True)
    return app


def wait_for_worker(app, timeout: float = 60) -> None:
    wait_for(lambda: bool(app.control.ping(timeout=0.5)), timeout, "the worker to answer a ping")


def tasks_per_second(app, count: int, queue: str) -> float:
    """Send `count` trivial tasks and collect every result; tasks per second over the whole batch."""
    task = app.tasks["bench.add"]
    started = time.perf_counter()
    results = [task.apply_async(args=(i, i), queue=queue) for i in range(count)]
    for index, result in enumerate(results):
        assert result.get(timeout=300) == 2 * index
    return count / (time.perf_counter() - started)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its children so far."""
    import psutil

    process = psutil.Process(pid)
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        times = member.cpu_times()
        total += times.user + times.system
    return total


def median(values: list[float]) -> float:
    return statistics.median(values)
