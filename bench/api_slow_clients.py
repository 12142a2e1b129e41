"""The API's /health latency while 100 clients stall (each kind of tests/slow_clients.py in turn),
against the same requests with no stalled client (the anchor), on one API in the same run.

    .venv/bin/python bench/api_slow_clients.py [--requests 50] [--stalled 100]

Each request is a new connection, as a monitor's would be. The stalled clients are all still
open while their round is measured (the server closes them REQUEST_TIMEOUT after they connect).
"""

from __future__ import annotations

import argparse
import http.client
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, env, free_port, median, process, wait_for  # noqa: E402
from tests.slow_clients import KINDS, StalledClients  # noqa: E402

HEALTH = "/health/api"  # this API alone: the stack's /health also asks for a worker and beat


def latency(port: int) -> float:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", HEALTH)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"bench: {HEALTH} answered {response.status}")
    finally:
        connection.close()
    return time.perf_counter() - started


def answers(port: int) -> bool:
    try:
        return latency(port) >= 0
    except (OSError, SystemExit):
        return False


def measure(port: int, count: int) -> list[float]:
    return [latency(port) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--stalled", type=int, default=100)
    options = parser.parse_args()
    api_port, broker_port = free_port(), free_port()
    environment = env(DIFY_PORT=str(api_port), REDIS_PORT=str(broker_port))
    with tempfile.TemporaryDirectory() as folder, \
            process([str(BIN / "dify-local"), "serve", "broker"], Path(folder), environment), \
            process([str(BIN / "dify-local"), "serve", "api"], Path(folder), environment):
        wait_for(lambda: answers(api_port), 60, "the API")
        measure(api_port, 10)  # warm up
        anchor = measure(api_port, options.requests)
        print(f"{HEALTH} with no stalled client: median {median(anchor) * 1000:.1f} ms, "
              f"max {max(anchor) * 1000:.1f} ms ({options.requests} requests)")
        for kind in KINDS:
            stalled = StalledClients(api_port, kind, options.stalled)
            try:
                times = measure(api_port, options.requests)
                still = stalled.open()
            finally:
                stalled.close()
            print(f"  {options.stalled} stalled ({kind:9}): median {median(times) * 1000:.1f} ms, "
                  f"max {max(times) * 1000:.1f} ms, ratio {median(times) / median(anchor):.2f}× the anchor's "
                  f"median; {still} of them still open at the end")


if __name__ == "__main__":
    main()
