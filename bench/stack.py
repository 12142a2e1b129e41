"""The whole stack under `dify-local up`: wall time from launch to the ready line, and the memory
(RSS) of all its processes together once ready. Runs `up` several times in fresh folders.

    .venv/bin/python bench/stack.py [--runs 5]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, env, free_port, median  # noqa: E402


def one_run() -> tuple[float, dict[str, float]]:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        proc = subprocess.Popen([str(BIN / "dify-local"), "up", "--port", str(free_port()),
                                 "--broker-port", str(free_port())], cwd=folder, env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        names: dict[int, str] = {proc.pid: "supervisor"}
        try:
            for line in proc.stdout:
                if "started (pid" in line:
                    name = line.split("|", 1)[1].split()[0]
                    names[int(line.split("(pid ")[1].split(")")[0])] = name
                if "ready in" in line:
                    break
            else:
                raise SystemExit("bench: up exited before it was ready")
            ready = time.perf_counter() - started
            time.sleep(1.0)  # let start-up garbage settle before reading memory
            memory: dict[str, float] = {}
            root = psutil.Process(proc.pid)
            for process in [root, *root.children(recursive=True)]:
                name = names.get(process.pid, "children")
                memory[name] = memory.get(name, 0.0) + process.memory_info().rss / 2**20
        finally:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
    return ready, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()
    readies, totals, last = [], [], {}
    for number in range(1, options.runs + 1):
        ready, memory = one_run()
        readies.append(ready)
        totals.append(sum(memory.values()))
        last = memory
        print(f"  run {number}: ready in {ready:.2f} s, RSS {sum(memory.values()):.0f} MiB")
    print(f"up → ready line: median {median(readies):.2f} s (min {min(readies):.2f}, max {max(readies):.2f})")
    print(f"RSS of the whole stack: median {median(totals):.0f} MiB; last run by process: "
          + ", ".join(f"{name} {mib:.0f}" for name, mib in last.items()))


if __name__ == "__main__":
    main()
