"""Does recording task runs in SQLite slow the worker?

The same 2,000 trivial tasks through dify-local's worker (which records every start and finish in
the metadata store) and through a plain `celery worker`, both on one real redis-server, same pool
(threads ×4) and prefetch, alternating in one run. Each round runs both back to back, so the
ratio is taken per round (both under the same load from whatever else shares the machine) and the
median of those is the figure; the ratio of the median rates is printed too. Target: at least 0.95×.

    .venv/bin/python bench/overhead.py [--tasks 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    BIN,
    client_app,
    cpu_seconds,
    env,
    median,
    process,
    redis_server,
    tasks_per_second,
    wait_for_worker,
)

QUEUE = "dataset"
CONCURRENCY = "4"
PREFETCH = "1"  # dify-local's default; the plain worker gets the same so only recording differs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    rates: dict[str, list[float]] = {"plain": [], "dify-local": []}
    cpu: dict[str, list[float]] = {"plain": [], "dify-local": []}  # worker CPU ms per task
    recorded = 0
    with redis_server() as (url, version, client), tempfile.TemporaryDirectory() as folder:
        broker_url = f"{url}/1"
        app = client_app(broker_url)
        print(f"overhead: {options.tasks} trivial tasks, threads ×{CONCURRENCY}, prefetch {PREFETCH}, "
              f"redis-server {version}, {options.rounds} alternating rounds")
        workers = {
            "plain": ([str(BIN / "celery"), "-A", "bench.plain_app", "worker", "-P", "threads", "-c", CONCURRENCY,
                       "-Q", QUEUE, "--prefetch-multiplier", PREFETCH, "-l", "WARNING"],
                      env(BENCH_BROKER_URL=broker_url)),
            "dify-local": ([str(BIN / "dify-local"), "serve", "worker", "-P", "threads", "-c", CONCURRENCY,
                            "-Q", QUEUE, "--prefetch-multiplier", PREFETCH, "-l", "WARNING", "-I", "bench.trivial"],
                           env(CELERY_BROKER_URL=broker_url, DIFY_LOCAL_STATE_DIR=folder)),
        }
        for round_number in range(1, options.rounds + 1):
            order = list(workers.items())
            if round_number % 2 == 0:  # alternate which goes first, so neither always runs second
                order.reverse()
            for name, (argv, environment) in order:
                client.flushall()
                with process(argv, Path(folder), environment) as worker:
                    wait_for_worker(app)
                    before = cpu_seconds(worker.pid)
                    rate = tasks_per_second(app, options.tasks, QUEUE)
                    cpu[name].append((cpu_seconds(worker.pid) - before) * 1000 / options.tasks)
                rates[name].append(rate)
                print(f"  round {round_number} {name:<10} {rate:8.0f} tasks/s, worker CPU {cpu[name][-1]:.3f} ms/task")
        with sqlite3.connect(Path(folder) / "metadata.db") as db:
            recorded = db.execute("SELECT COUNT(*) FROM task_runs WHERE state = 'SUCCESS'").fetchone()[0]
        app.close()
    plain, ours = median(rates["plain"]), median(rates["dify-local"])
    paired = [mine / anchor for mine, anchor in zip(rates["dify-local"], rates["plain"], strict=True)]
    print(f"plain celery worker: {plain:.0f} tasks/s (median), worker CPU {median(cpu['plain']):.3f} ms/task")
    print(f"dify-local worker:   {ours:.0f} tasks/s (median), worker CPU {median(cpu['dify-local']):.3f} ms/task "
          f"({recorded} task runs recorded in SQLite)")
    print(f"ratio of the median rates: {ours / plain:.2f}×; per round: " + ", ".join(f"{r:.2f}" for r in paired))
    ratio = median(paired)
    print(f"ratio dify-local / plain (median of rounds): {ratio:.2f}× (target ≥ 0.95×) "
          f"{'OK' if ratio >= 0.95 else 'BELOW TARGET'}")


if __name__ == "__main__":
    main()
