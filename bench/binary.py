"""The binary against the installed command: sizes, and the wall time from `up` to its ready line.

Three ways to run the same stack, taking turns in fresh folders, several rounds: the installed
command (the virtualenv's `dify-local`, the anchor), the one-folder binary and the one-file
binary, both run with a clean environment (no virtualenv on PATH). Build them first with
`./dev build`. Targets: one-file binary at most 60 MB; one-folder start at most 1.2× the
installed command's (median of rounds).

    .venv/bin/python bench/binary.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, REPO, env, free_port, median  # noqa: E402

ONE_FILE = REPO / "dist" / "dify-local"
ONE_FOLDER = REPO / "dist" / "dify-local-dir" / "dify-local"
SIZE_TARGET_MB = 60
START_TARGET = 1.2


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [item for item in path.rglob("*") if item.is_file() and not item.is_symlink()]
    return sum(item.stat().st_size for item in files) / 1e6


def time_to_ready(program: Path, environment: dict[str, str]) -> float:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        proc = subprocess.Popen([str(program), "up", "--no-reload", "--port", str(free_port()),
                                 "--broker-port", str(free_port())], cwd=folder, env=environment,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            for line in proc.stdout:
                if "ready in" in line:
                    return time.perf_counter() - started
            raise SystemExit(f"bench: {program} up exited before it was ready")
        finally:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    options = parser.parse_args()
    for binary in (ONE_FILE, ONE_FOLDER):
        if not binary.is_file():
            raise SystemExit(f"bench: no {binary.relative_to(REPO)}; build it with ./dev build")
    one_file, one_folder = size_mb(ONE_FILE), size_mb(ONE_FOLDER.parent)
    print(f"sizes: one file {one_file:.1f} MB (target ≤ {SIZE_TARGET_MB} MB) "
          f"{'OK' if one_file <= SIZE_TARGET_MB else 'ABOVE TARGET'}; one folder {one_folder:.1f} MB in all")
    with tempfile.TemporaryDirectory() as home:
        clean = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8"}
        sides = {"installed": (BIN / "dify-local", env()), "one folder": (ONE_FOLDER, clean),
                 "one file": (ONE_FILE, clean)}
        times: dict[str, list[float]] = {name: [] for name in sides}
        print(f"`up` to ready, {options.rounds} rounds, taking turns:")
        for number in range(1, options.rounds + 1):
            order = list(sides.items())
            order = order[number % len(order):] + order[:number % len(order)]
            for name, (program, environment) in order:
                times[name].append(time_to_ready(program, environment))
            print("  round %d: %s" % (number, ", ".join(f"{name} {times[name][-1]:.2f} s" for name in sides)))
    medians = {name: median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"  {name:<10} {value:.2f} s (median)")
    ratio = medians["one folder"] / medians["installed"]
    print(f"one-folder start / installed start: {ratio:.2f}× (target ≤ {START_TARGET}×) "
          f"{'OK' if ratio <= START_TARGET else 'ABOVE TARGET'}; "
          f"one file {medians['one file'] / medians['installed']:.2f}×")


if __name__ == "__main__":
    main()
