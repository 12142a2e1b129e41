"""`dify-local doctor`: the seed's troubleshooting steps as checks. Each says pass or fail (warn when
something is odd but works, skip when an earlier failure makes it moot) and, failing, what to do.

Checks run in two rounds, those of a round at once: first what needs nothing else (the broker,
the database, the state folder, the ports), then what needs the broker to answer (workers, beat)
or the database (documents). Each is bounded in time: one that has not finished by its deadline
is reported as such, so the doctor answers in seconds even when the broker or the database hangs.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from runner.doctor.broker_checks import check_beat, check_broker, check_consumers, check_worker
from runner.doctor.context import APP_TIMEOUT, FAIL, PASS, SKIP, WARN, Context, Result
from runner.doctor.host_checks import check_ports, check_state_folder
from runner.doctor.store_checks import check_documents, check_migrations
from runner.settings import Settings

Check = Callable[[Context], Result]
ROUNDS: tuple[tuple[tuple[str, Check], ...], ...] = (
    (("broker", check_broker), ("migrations", check_migrations), ("state", check_state_folder),
     ("ports", check_ports)),
    (("consumers", check_consumers), ("worker", check_worker), ("beat", check_beat),
     ("documents", check_documents)),
)
ORDER = ("broker", "migrations", "consumers", "worker", "beat", "documents", "state", "ports")  # the seed's order
ROUND_TIMEOUT = 6.0  # seconds; the broker's own operations are bounded well within it

__all__ = ["FAIL", "ORDER", "PASS", "SKIP", "WARN", "Result", "run_doctor"]


def run_doctor(settings: Settings) -> list[Result]:
    """Every check's result, in the seed's order."""
    ctx = Context(settings)
    longer: dict[str, float] = {}
    if ctx.app_line() is not None:
        # a project's own app imports for seconds (a Dify app for 20): from the start, beside round one,
        # and only the check that reads it waits for it longer than a round
        threading.Thread(target=_quietly, args=(ctx.app_topology,), name="doctor-app", daemon=True).start()
        longer["consumers"] = time.monotonic() + APP_TIMEOUT + 1
    try:
        for checks in ROUNDS:
            ctx.results.update(_run_round(ctx, checks, longer=longer))
    finally:
        ctx.close()
    return [ctx.results[name] for name in ORDER]


def _quietly(compute: Callable[[], object]) -> None:
    try:
        compute()
    except Exception:  # kept by ctx.once; the check that reads it reports it
        pass


def _run_round(ctx: Context, checks: tuple[tuple[str, Check], ...],
               longer: dict[str, float] | None = None) -> dict[str, Result]:
    """Each check of the round at once, each by ROUND_TIMEOUT from now (or by its `longer` deadline)."""
    results: dict[str, Result] = {}

    def run(name: str, check: Check) -> None:
        try:
            results[name] = check(ctx)
        except Exception as error:  # a check's own failure is reported, never a traceback
            results[name] = Result(name, FAIL, f"could not run: {type(error).__name__}: {error}",
                                   fix="run `dify-local doctor` again; if it persists, report it with this line")

    threads = [threading.Thread(target=run, args=check, name=f"doctor-{check[0]}", daemon=True) for check in checks]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    deadlines = {name: max(started + ROUND_TIMEOUT, (longer or {}).get(name, 0.0)) for name, _ in checks}
    for (name, _), thread in zip(checks, threads, strict=True):
        thread.join(max(0.0, deadlines[name] - time.monotonic()))
    for name, _ in checks:
        if name not in results:  # still waiting on something: the broker, a lock, a socket
            results[name] = Result(name, FAIL, f"did not finish within {deadlines[name] - started:.0f} s",
                                   fix="the broker or the database does not answer in time: see the other checks, "
                                       "then run `dify-local doctor` again")
    return dict(results)
