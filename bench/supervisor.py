"""The supervisor against its anchors, in one run:

1. time from launching `dify-local up` to its ready line (every process ready, the embedded broker
   started too) against a bare `celery worker` with default options reaching its first ping on an
   already running redis-server (target: at most 1.0×);
2. the RSS of the whole stack once ready against the sum of the bare processes started
   separately: `celery worker`, `celery beat`, `flask run`, fakeredis' TCP server (target: at most
   1.2×);
3. the supervisor's own CPU while the stack idles against `honcho start` of the same Procfile
   (honcho's main process and the helper process it runs for each line).

    .venv/bin/python bench/supervisor.py [--runs 5] [--idle 60]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, REPO, client_app, env, free_port, median, redis_server, wait_for  # noqa: E402

SETTLE = 1.0  # seconds after ready before memory is read: start-up garbage collected


def tree_rss(pid: int) -> float:
    """MiB: a process and all its descendants."""
    root = psutil.Process(pid)
    return sum(member.memory_info().rss for member in [root, *root.children(recursive=True)]) / 2**20


def start_up(folder: str) -> tuple[subprocess.Popen, float]:
    """`dify-local up` in a fresh folder: the process and the seconds until its ready line."""
    started = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "dify-local"), "up", "--port", str(free_port()), "--broker-port",
                             str(free_port())], cwd=folder, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:
        if "ready in" in line:
            return proc, time.perf_counter() - started
    raise SystemExit("bench: up exited before it was ready")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def bare_worker_ready(broker_url: str, app) -> tuple[subprocess.Popen, float]:
    started = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "celery"), "-A", "bench.plain_app", "worker"], cwd=str(REPO),
                            env=env(BENCH_BROKER_URL=broker_url), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: bool(app.control.ping(timeout=0.05)), 60, "the bare worker")
    return proc, time.perf_counter() - started


def readiness(runs: int) -> tuple[float, float]:
    ours, bare = [], []
    with redis_server() as (url, _, client):
        app = client_app(f"{url}/1")
        for number in range(1, runs + 1):
            with tempfile.TemporaryDirectory() as folder:
                proc, seconds = start_up(folder)
                stop(proc)
            ours.append(seconds)
            client.flushall()
            proc, seconds = bare_worker_ready(f"{url}/1", app)
            bare.append(seconds)
            proc.terminate()
            proc.wait(30)
            print(f"  run {number}: dify-local up → ready {ours[-1]:.2f} s; bare celery worker → ping {bare[-1]:.2f} s")
        app.close()
    return median(ours), median(bare)


def memory() -> tuple[float, float, dict[str, float]]:
    with tempfile.TemporaryDirectory() as folder:
        proc, _ = start_up(folder)
        time.sleep(SETTLE)
        ours = tree_rss(proc.pid)
        stop(proc)
    parts: dict[str, float] = {}
    with redis_server() as (url, _, _client), ExitStack() as stack:
        broker_port = free_port()
        started = {
            "celery worker": [str(BIN / "celery"), "-A", "bench.plain_app", "worker", "-l", "WARNING"],
            "celery beat": [str(BIN / "celery"), "-A", "bench.plain_app", "beat", "-s",
                            str(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "schedule")],
            "flask run": [str(BIN / "flask"), "--app", "bench.plain_flask", "run", "--port", str(free_port())],
            "fakeredis server": [sys.executable, "-m", "bench.plain_broker", str(broker_port)],
        }
        procs = {name: subprocess.Popen(argv, cwd=str(REPO), env=env(BENCH_BROKER_URL=f"{url}/1"),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                 for name, argv in started.items()}
        app = client_app(f"{url}/1")
        wait_for(lambda: bool(app.control.ping(timeout=0.1)), 60, "the bare worker")
        app.close()
        time.sleep(SETTLE + 1.0)  # beat and flask up, start-up garbage collected
        for name, proc in procs.items():
            parts[name] = tree_rss(proc.pid)
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(30)
    return ours, sum(parts.values()), parts


def supervisor_cpu(idle: float) -> tuple[float, float]:
    """CPU seconds per minute of idling: dify-local's supervisor, and honcho start (main + helpers)."""
    with tempfile.TemporaryDirectory() as folder:
        proc, _ = start_up(folder)
        time.sleep(2)
        supervisor = psutil.Process(proc.pid)
        before = sum(supervisor.cpu_times()[:2])
        time.sleep(idle)
        ours = (sum(supervisor.cpu_times()[:2]) - before) * 60 / idle
        stop(proc)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "Procfile").write_text((REPO / "Procfile").read_text())
        honcho = subprocess.Popen([str(BIN / "honcho"), "start"], cwd=folder,
                                  env=env(REDIS_PORT=str(free_port()), DIFY_PORT=str(free_port())),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(6)  # honcho has no readiness: give the stack time to come up
        main = psutil.Process(honcho.pid)
        helpers = main.children()  # one multiprocessing helper per Procfile line
        members = [main, *helpers]
        before = sum(sum(member.cpu_times()[:2]) for member in members)
        time.sleep(idle)
        theirs = (sum(sum(member.cpu_times()[:2]) for member in members) - before) * 60 / idle
        honcho.send_signal(signal.SIGINT)
        honcho.wait(60)
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--idle", type=float, default=60.0,
                        help="seconds of idling measured for CPU (psutil counts in 10 ms steps)")
    options = parser.parse_args()
    print(f"1. readiness, {options.runs} alternating runs")
    ours, bare = readiness(options.runs)
    ratio = ours / bare
    print(f"   dify-local up → every process ready: {ours:.2f} s (median); bare celery worker → first ping: "
          f"{bare:.2f} s (median)")
    print(f"   ratio {ratio:.2f}× (target ≤ 1.0×) {'OK' if ratio <= 1.0 else 'ABOVE TARGET'}")
    print("2. memory (RSS, whole process trees)")
    stack, bare_sum, parts = memory()
    ratio = stack / bare_sum
    print(f"   dify-local stack: {stack:.0f} MiB; bare processes: {bare_sum:.0f} MiB ("
          + ", ".join(f"{name} {mib:.0f}" for name, mib in parts.items()) + ")")
    print(f"   ratio {ratio:.2f}× (target ≤ 1.2×) {'OK' if ratio <= 1.2 else 'ABOVE TARGET'}")
    print(f"3. supervisor CPU while idle, {options.idle:.0f} s each")
    ours_cpu, honcho_cpu = supervisor_cpu(options.idle)
    print(f"   dify-local supervisor: {ours_cpu:.3f} CPU s/min; honcho start: {honcho_cpu:.3f} CPU s/min; "
          f"ratio {ours_cpu / honcho_cpu:.2f}×" if honcho_cpu else f"   dify-local {ours_cpu:.3f}, honcho 0")


if __name__ == "__main__":
    main()
