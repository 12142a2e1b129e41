"""The embedded broker against real redis-server, end to end through Celery.

The same benchmark on both, in one run: a plain Celery worker (threads ×4) and a client, 2,000
trivial tasks sent and every result collected, results kept on the same server. Both servers
require a password. Two pairings, each like for like: durable (the embedded broker's append-only
log against redis-server's, both written before each batch's replies and fsynced every second)
and memory only (`--no-persist` against redis-server without persistence). Rounds alternate which
broker goes first; each pairing's figure is the median of its per-round ratios embedded / real
(target: at least 0.9× for both).

The embedded broker runs its compiled read loop (runner/broker/_session.c) where it is built;
`--read-loop python` measures the Python one it mirrors (DIFY_LOCAL_BROKER_COMPILED=false).

    .venv/bin/python bench/broker.py [--tasks 2000] [--rounds 9] [--pairing durable|memory|both]
                                     [--read-loop compiled|python]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    BIN,
    REPO,
    client_app,
    cpu_seconds,
    env,
    free_port,
    median,
    process,
    redis_server,
    tasks_per_second,
    wait_for_ping,
    wait_for_worker,
)

PASSWORD = "bench-pw"
QUEUE = "celery"


@contextmanager
def embedded_broker(folder: str, durable: bool, read_loop: str = "compiled"):
    import redis

    port = free_port()
    argv = [str(BIN / "dify-local"), "serve", "broker", "--port", str(port), "--password", PASSWORD,
            *([] if durable else ["--no-persist"])]
    compiled = "true" if read_loop == "compiled" else "false"
    with process(argv, Path(folder), env(DIFY_LOCAL_STATE_DIR=folder, DIFY_LOCAL_BROKER_COMPILED=compiled)) as proc:
        client = redis.Redis(port=port, password=PASSWORD)
        wait_for_ping(client, 30, "the embedded broker")
        running = client.info("server").get("read_loop")
        if running != read_loop:  # (the compiled one asked for but not built)
            raise SystemExit(f"bench: the embedded broker runs its {running} read loop, not the {read_loop} one "
                             "(is the C extension built? reinstall with a C compiler: ./dev)")
        yield f"redis://:{PASSWORD}@127.0.0.1:{port}", client, proc.pid


@contextmanager
def real_broker(durable: bool):
    with redis_server(password=PASSWORD, durable=durable) as (url, version, client):
        pid = int(client.info("server")["process_id"])
        yield url, client, pid, version


def one_round(url: str, client, server_pid: int, tasks: int) -> tuple[float, float]:
    """Tasks per second, and the server's CPU ms per task."""
    client.flushall()
    broker_url = f"{url}/1"
    app = client_app(broker_url)
    argv = [str(BIN / "celery"), "-A", "bench.plain_app", "worker", "-P", "threads", "-c", "4", "-l", "WARNING"]
    with process(argv, REPO, env(BENCH_BROKER_URL=broker_url)):
        wait_for_worker(app)
        before = cpu_seconds(server_pid)
        rate = tasks_per_second(app, tasks, QUEUE)
        server_cpu = (cpu_seconds(server_pid) - before) * 1000 / tasks
    app.close()
    return rate, server_cpu


def pairing(durable: bool, tasks: int, rounds: int, read_loop: str) -> float:
    """One like-for-like pairing; prints each round and returns the median ratio."""
    rates: dict[str, list[float]] = {"embedded": [], "redis-server": []}
    cpu: dict[str, list[float]] = {"embedded": [], "redis-server": []}
    with tempfile.TemporaryDirectory() as folder, embedded_broker(folder, durable, read_loop) as embedded, \
            real_broker(durable) as real:
        what = ("durable: append-only logs fsynced every second (embedded default; redis-server "
                "--appendonly yes --appendfsync everysec)" if durable else
                "memory only: embedded --no-persist; redis-server --save '' --appendonly no")
        print(f"{what}; embedded: {read_loop} read loop; redis-server {real[3]}")
        brokers = {"embedded": embedded, "redis-server": real[:3]}
        for number in range(1, rounds + 1):
            order = list(brokers.items()) if number % 2 else list(reversed(brokers.items()))
            for name, (url, client, pid) in order:
                rate, server_cpu = one_round(url, client, pid, tasks)
                rates[name].append(rate)
                cpu[name].append(server_cpu)
                print(f"  round {number} {name:<12} {rate:7.0f} tasks/s, broker CPU {server_cpu:.3f} ms/task")
    paired = [mine / anchor for mine, anchor in zip(rates["embedded"], rates["redis-server"], strict=True)]
    for name in rates:
        print(f"  {name:<12} {median(rates[name]):7.0f} tasks/s (median), broker CPU {median(cpu[name]):.3f} ms/task")
    ratio = median(paired)
    print("  per round: " + ", ".join(f"{r:.2f}" for r in paired))
    print(f"  ratio embedded / redis-server (median of rounds): {ratio:.2f}×")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--pairing", choices=("durable", "memory", "both"), default="both")
    parser.add_argument("--read-loop", choices=("compiled", "python"), default="compiled",
                        help="the embedded broker's read loop (default: the compiled one)")
    options = parser.parse_args()
    print(f"broker: {options.tasks} trivial tasks, plain celery worker threads ×4, results on the same server, "
          f"{options.rounds} rounds per pairing")
    ratios = {}
    for durable in (True, False):
        label = "durable" if durable else "memory"
        if options.pairing in (label, "both"):
            ratios[label] = pairing(durable, options.tasks, options.rounds, options.read_loop)
    summary = ", ".join(f"{label} {ratio:.3f}×" for label, ratio in ratios.items())  # 0.899 must not read 0.90
    lowest = min(ratios.values())
    print(f"ratio embedded / redis-server: {summary} (target ≥ 0.9×) {'OK' if lowest >= 0.9 else 'BELOW TARGET'}")


if __name__ == "__main__":
    main()
