"""Two versions of the embedded broker against each other, end to end through Celery.

This machine's noise (single rounds of bench/broker.py move ±10%) hides a change worth a few per
cent; here both versions run the same benchmark in alternating rounds, under the same noise, and
the figure is the median of the per-round ratios B / A. A version is a folder holding a `runner`
package (a checkout or a worktree: `git worktree add /tmp/before HEAD~1`).

    .venv/bin/python bench/broker_ab.py A_FOLDER B_FOLDER [--rounds 7] [--persist] [--tasks 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.broker import PASSWORD, one_round  # noqa: E402
from bench.common import BIN, env, free_port, median, process, wait_for_ping  # noqa: E402


@contextmanager
def broker_from(tree: Path, folder: str, persist: bool):
    """`dify-local serve broker` with the runner package of `tree`."""
    import redis

    if not (tree / "runner" / "broker" / "server.py").is_file():
        raise SystemExit(f"bench: {tree} holds no runner/broker/server.py (a dify-local checkout is needed)")
    port = free_port()
    launcher = f"import sys; sys.path.insert(0, {str(tree)!r}); sys.argv[0] = 'dify-local'; " \
               "from runner.cli import main; main()"
    argv = [str(BIN / "python"), "-c", launcher, "serve", "broker", "--port", str(port), "--password", PASSWORD,
            *([] if persist else ["--no-persist"])]
    with process(argv, Path(folder), env(DIFY_LOCAL_STATE_DIR=folder)) as proc:
        client = redis.Redis(port=port, password=PASSWORD)
        wait_for_ping(client, 30, f"the embedded broker from {tree}")
        yield f"redis://:{PASSWORD}@127.0.0.1:{port}", client, proc.pid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="folder with the first version (A)")
    parser.add_argument("b", type=Path, help="folder with the second version (B)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--persist", action="store_true", help="with the append-only log (default: --no-persist)")
    options = parser.parse_args()
    print(f"broker A/B: {options.tasks} trivial tasks per round, {options.rounds} rounds, "
          f"{'with' if options.persist else 'without'} the log; A = {options.a}, B = {options.b}")
    ratios = []
    with tempfile.TemporaryDirectory() as folder_a, tempfile.TemporaryDirectory() as folder_b, \
            broker_from(options.a.resolve(), folder_a, options.persist) as a, \
            broker_from(options.b.resolve(), folder_b, options.persist) as b:
        for number in range(1, options.rounds + 1):
            order = [("A", a), ("B", b)] if number % 2 else [("B", b), ("A", a)]
            results = {name: one_round(url, client, pid, options.tasks) for name, (url, client, pid) in order}
            ratios.append(results["B"][0] / results["A"][0])
            print(f"  round {number}: A {results['A'][0]:5.0f} tasks/s ({results['A'][1]:.3f} ms/task broker CPU), "
                  f"B {results['B'][0]:5.0f} tasks/s ({results['B'][1]:.3f}), B/A {ratios[-1]:.2f}")
    print(f"B / A (median of rounds): {median(ratios):.2f}× (rounds {min(ratios):.2f}–{max(ratios):.2f})")


if __name__ == "__main__":
    main()
