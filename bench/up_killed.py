"""How long what `up` started outlives it after `kill -9` of `up`: the four roles, another
project's `python3 -m http.server` and a daemon (double fork, setsid) a Procfile line starts,
until every one of them is gone and every port free. Once with the cgroup `up` makes (the daemon
clears its environment) and once with the environment marker alone (DIFY_LOCAL_CGROUP=false).
The anchor, in the same run: the same stack stopped by `up` itself (SIGINT). README promises 5 s.

    .venv/bin/python bench/up_killed.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, REPO, env, free_port, median, wait_for  # noqa: E402

ROLES = ("broker", "api", "worker", "beat")
PROMISE = 5.0  # seconds (README: "all gone within 5 s")


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def one_run(mode: str, stop: signal.Signals) -> float:
    """Seconds from the signal to `up` until nothing it started runs and its ports are free."""
    with tempfile.TemporaryDirectory() as folder:
        web, daemon, api, broker = free_port(), free_port(), free_port(), free_port()
        pidfile = Path(folder) / "daemon.pid"
        clean = " --clean-env" if mode == "cgroup" else ""
        (Path(folder) / "Procfile").write_text(
            "".join(f"{role}: dify-local serve {role}\n" for role in ROLES)
            + f"web: python3 -m http.server {web} --bind 127.0.0.1\n"
            + f"launcher: python3 {REPO / 'tests' / 'support' / 'daemonise.py'} {daemon} {pidfile}{clean}\n")
        environment = env(DIFY_LOCAL_CGROUP="true" if mode == "cgroup" else "false",
                          DIFY_PORT=str(api), REDIS_PORT=str(broker))
        proc = subprocess.Popen([str(BIN / "dify-local"), "up", "--no-reload"], cwd=folder, env=environment,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        pids: list[int] = []
        try:
            for line in proc.stdout:
                if "no writable cgroup" in line and mode == "cgroup":
                    raise SystemExit(f"bench: {line.strip()}")
                if "ready in" in line:
                    break
            else:
                raise SystemExit("bench: up exited before it was ready")
            wait_for(lambda: pidfile.exists() and listening(web) and listening(daemon), 30, "the server and daemon")
            rows = json.loads(subprocess.run([str(BIN / "dify-local"), "ps", "--json"], cwd=folder, env=environment,
                                             capture_output=True, text=True, check=True).stdout)["processes"]
            pids = [row["pid"] for row in rows] + [int(pidfile.read_text())]
            began = time.perf_counter()
            proc.send_signal(stop)
            wait_for(lambda: all(gone(pid) for pid in pids)
                     and not any(listening(port) for port in (web, daemon, api, broker)), 60, "everything to stop")
            took = time.perf_counter() - began
        finally:
            for pid in [proc.pid, *pids]:
                try:
                    psutil.Process(pid).kill()
                except psutil.Error:
                    pass
            proc.communicate(timeout=60)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    results: dict[str, list[float]] = {"stopped by up (SIGINT)": [], "cgroup": [], "environment": []}
    for number in range(1, options.runs + 1):
        for name in results:
            mode, stop = (name, signal.SIGKILL) if name != "stopped by up (SIGINT)" else ("cgroup", signal.SIGINT)
            took = one_run(mode, stop)
            results[name].append(took)
            print(f"  run {number}, {name}: all gone in {took:.2f} s")
    anchor = median(results["stopped by up (SIGINT)"])
    print(f"anchor, the stack stopped by `up` itself: median {anchor:.2f} s")
    for name in ("cgroup", "environment"):
        times = results[name]
        print(f"kill -9 of `up`, {name}: median {median(times):.2f} s, max {max(times):.2f} s "
              f"({median(times) / anchor:.2f}× the anchor; promised at most {PROMISE:.0f} s)")


if __name__ == "__main__":
    main()
