"""EVALSHA through the embedded broker's Lua sandbox against real redis-server, in one run.

kombu refreshes its bindings with an EVALSHA of REFRESH_BINDING (SADD, TIME, ZADD) and Celery's
chords use EVALSHA too: one client calls each script the given number of times, one call at a time
as kombu does, on both servers; rounds alternate which server goes first. Prints each server's
calls per second and the median of the per-round ratios embedded / real, for kombu's script and
for a script that returns at once (the sandbox's own cost per call). The embedded broker runs its
compiled read loop, memory only (`--no-persist`), as redis-server here.

    .venv/bin/python bench/lua.py [--calls 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, env, free_port, median, process, redis_server, wait_for_ping  # noqa: E402

PASSWORD = "bench-pw"
SCRIPTS = {
    # kombu.transport.redis.REFRESH_BINDING, as kombu sends it
    "kombu's REFRESH_BINDING": (
        "redis.call('SADD', KEYS[1], ARGV[1])\n"
        "local now = redis.call('TIME')\n"
        "local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)\n"
        "redis.call('ZADD', KEYS[2], 'GT', ms + tonumber(ARGV[3]), ARGV[2])\n",
        ["_kombu.binding.celery", "_kombu.binding.deadlines"], ["celery\x06\x16\x06\x16celery", "celery", "60000"]),
    "return 1": ("return 1", [], []),
}


@contextmanager
def embedded_broker(folder: str):
    import redis

    port = free_port()
    argv = [str(BIN / "dify-local"), "serve", "broker", "--port", str(port), "--password", PASSWORD, "--no-persist"]
    with process(argv, Path(folder), env(DIFY_LOCAL_STATE_DIR=folder)):
        client = redis.Redis(port=port, password=PASSWORD)
        wait_for_ping(client, 30, "the embedded broker")
        yield client


def calls_per_second(client, script: str, keys: list[str], args: list[str], calls: int) -> float:
    call = client.register_script(script)
    call(keys=keys, args=args)  # loaded (EVALSHA after NOSCRIPT, as kombu does)
    start = time.perf_counter()
    for _ in range(calls):
        call(keys=keys, args=args)
    return calls / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, embedded_broker(folder) as embedded, \
            redis_server(PASSWORD) as (_, version, real):
        print(f"bench/lua.py: {options.calls} EVALSHA per script and round, {options.rounds} rounds; "
              f"redis-server {version}")
        for name, (script, keys, args) in SCRIPTS.items():
            ratios, ours, theirs = [], [], []
            for round_ in range(options.rounds):
                order = [(embedded, ours), (real, theirs)]
                if round_ % 2:
                    order.reverse()
                for client, figures in order:
                    figures.append(calls_per_second(client, script, keys, args, options.calls))
                ratios.append(ours[-1] / theirs[-1])
            print(f"  {name}: embedded {median(ours):,.0f}/s, redis-server {median(theirs):,.0f}/s, "
                  f"ratio {median(ratios):.2f}x")


if __name__ == "__main__":
    main()
