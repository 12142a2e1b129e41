"""`doctor`: the seed's troubleshooting checks, one line each, then what to do about each failure."""

from __future__ import annotations

import json
import sys
import time

import click

from runner.cli import main, settings_from
from runner.settings.loader import IF_POSSIBLE

MARKS = {"pass": ("✓", "green"), "fail": ("✗", "red"), "warn": ("!", "yellow"), "skip": ("-", None)}


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@click.option("--stuck-minutes", metavar="MINUTES",
              help="Report documents in progress for longer than this (DIFY_LOCAL_STUCK_DOCUMENT_MINUTES, default 10).")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool, stuck_minutes: str | None) -> None:
    """Check the broker, migrations, queue consumers, worker, beat, stuck documents, the state folder
    and the ports; say what to do about each failure. Exit status 1 when any check fails."""
    from runner.doctor import FAIL, run_doctor

    settings = settings_from(ctx, make_password=IF_POSSIBLE,
                             stuck=("--stuck-minutes", "DIFY_LOCAL_STUCK_DOCUMENT_MINUTES", stuck_minutes))
    started = time.monotonic()
    results = run_doctor(settings)
    elapsed = time.monotonic() - started
    failed = [result for result in results if result.status == FAIL]
    if as_json:
        click.echo(json.dumps({"ok": not failed, "seconds": round(elapsed, 2),
                               "checks": [result.to_json() for result in results]}, indent=2, default=str))
        sys.exit(1 if failed else 0)
    width = max(len(result.name) for result in results)
    for result in results:
        mark, color = MARKS[result.status]
        click.echo(f"{click.style(mark, fg=color, bold=True)} {result.name.ljust(width)}  {result.detail}")
        for line in result.lines if result.status != "pass" else ():  # a pass's particulars: --json
            click.echo(f"  {' ' * width}    {line}")
    fixes = [result for result in results if result.fix and result.status != "pass"]
    if fixes:
        click.echo("\nTo fix:")
        for result in fixes:
            click.echo(f"  {result.name.ljust(width)}  {result.fix}")
    counts = {status: sum(result.status == status for result in results) for status in MARKS}
    summary = ", ".join(f"{count} {word}" for word, count in
                        (("passed", counts["pass"]), ("failed", counts["fail"]), ("warned", counts["warn"]),
                         ("skipped", counts["skip"])) if count)
    click.echo(f"\n{summary} ({elapsed:.1f} s)")
    sys.exit(1 if failed else 0)
