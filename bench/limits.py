"""What do the parsing limits cost? Each workflow template and each document extraction now runs
in a forked child with limits (runner.limited_process) instead of in the worker itself.

The anchor is the same work in-process, in the same run, alternating: a small workflow (start, a
template, a condition, end) run N times, and a small DOCX and PDF extracted N times. Prints the
time per item both ways, the ratio (limited / in-process; the target for templates is the cost of
a fork, a few milliseconds, on work that takes under one) and the per-call overhead.

    .venv/bin/python bench/limits.py [--runs 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner import limited_process, workflows  # noqa: E402
from runner.rag import extract  # noqa: E402

GRAPH = {"nodes": [{"id": "start", "type": "start", "variables": ["name"]},
                   {"id": "greet", "type": "template", "template": "Hello {{ name }}!", "output": "greeting"},
                   {"id": "long", "type": "condition", "expression": "greeting|length > 3"},
                   {"id": "end", "type": "end", "outputs": ["greeting"]}],
         "edges": [{"source": "start", "target": "greet"}, {"source": "greet", "target": "long"},
                   {"source": "long", "target": "end", "branch": "true"}]}


def documents(folder: Path) -> list[tuple[Path, str]]:
    import docx
    from fpdf import FPDF

    document = docx.Document()
    for number in range(50):
        document.add_paragraph(f"Paragraph {number} of a small document about nothing in particular.")
    buffer = io.BytesIO()
    document.save(buffer)
    (folder / "a.docx").write_bytes(buffer.getvalue())
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.multi_cell(0, 8, "A small PDF page about nothing in particular. " * 20)
    (folder / "a.pdf").write_bytes(bytes(pdf.output()))
    return [(folder / "a.docx", "docx"), (folder / "a.pdf", "pdf")]


def timed(function, runs: int) -> float:
    started = time.perf_counter()
    for _ in range(runs):
        function()
    return (time.perf_counter() - started) / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        files = documents(Path(folder))
        work = {
            "workflow (2 templates)": lambda: workflows.run(GRAPH, {"name": "bench"}),
            **{f"extract {kind}": (lambda path=path, kind=kind: extract.extract(path, kind)) for path, kind in files},
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in work}
        for _ in range(options.rounds):
            for name, function in work.items():
                limited = timed(function, options.runs)
                limited_process.CAN_FORK = False  # the anchor: the same calls, in this process
                try:
                    inline = timed(function, options.runs)
                finally:
                    limited_process.CAN_FORK = True
                results[name].append((limited, inline))
    print(f"limits: {options.runs} runs × {options.rounds} rounds, medians per item")
    for name, pairs in results.items():
        limited = statistics.median(pair[0] for pair in pairs)
        inline = statistics.median(pair[1] for pair in pairs)
        ratio = statistics.median(pair[0] / pair[1] for pair in pairs)
        print(f"  {name:24} limited {limited * 1000:7.2f} ms   in-process {inline * 1000:7.2f} ms   "
              f"ratio {ratio:5.2f}×   overhead {(limited - inline) * 1000:6.2f} ms")


if __name__ == "__main__":
    main()
