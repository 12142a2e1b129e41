"""Hot-reload latency: `dify-local up` against the usual `watchfiles` + `celery worker` workaround.

What it measures: from the moment a task module is saved until a task sent afterwards returns the
new code's value. Target: ours at most 0.35× the baseline (the issue measured the baseline at
1.43 s).

How, both sides in one run against one real redis-server the script starts (so only the reload
mechanism differs):

  baseline  a plain Celery app (`app.py`, task `probe_value` returning a module-level VALUE) run as
            watchfiles --filter python 'celery -A app worker -P threads -c 4 -Q baseline
                                        --without-mingle --without-gossip -l WARNING' <folder>
            on Redis db 2. Without mingle and gossip the plain worker starts about a second sooner
            than Celery's default: the faster, fairer anchor, which the target is checked against.
  default   the same with Celery's default start-up (mingle and gossip on), as the issue's
            `watchfiles --filter python 'celery -A app worker …'` ran it: printed for reference
            (queue `baseline_default`, Redis db 3).
  ours      a project folder whose Procfile is only
                worker: dify-local serve worker -I probe_tasks -P threads -c 4 -l WARNING
            (`probe_tasks.py` defines `probe_value` the same way), run by
            dify-local up --broker <redis>/1 --watch <project folder>
            and probed on the `mail` queue. It watches the project folder only, as the baseline
            does (not dify-local's own code, which others may be editing meanwhile).

A round, for one side: check the side answers with its current value; t0; rewrite the module with
`VALUE = <new number>` (a plain write, as an editor saves); then send `probe_value` and wait for its
result (3 s per call; a task sent while no worker consumes waits in its queue), again and again,
until a result carries the new value. Latency = that result's arrival − t0. The sides take turns
round by round (each goes first in turn) and all three stacks run the whole time. Rounds are
3 s apart: `up` starts a pre-loaded spare worker about 1 s after each reload, and a developer's
saves are seconds apart too. Nothing is discarded: `up` keeps a spare only for a process reloaded
once, so ours' first round is a cold start, as a developer's first save is.

Checks beside the timing: for a second after each new value, more probes check that the old value
does not come back (ours' successor consumes before the old worker's warm shutdown, so the two
overlap for a moment; each old answer is reported, with when, and a second median counts until the
old code stopped answering); at the end, every probe sent must have its result (none lost).

Prints every round, each side's median, and the ratio of medians ours / baseline.

    .venv/bin/python bench/reload.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, env, free_port, median, redis_server, wait_for  # noqa: E402

PASSWORD = "bench-pw"
TARGET = 0.35
CALL_TIMEOUT = 3.0  # seconds one probe may wait for its result before another is sent
ROUND_TIMEOUT = 30.0  # seconds a reload may take before the run stops with an error
SETTLE = 3.0  # seconds between rounds
AFTER = 1.0  # seconds of probes after the new value, each of which must return it too
BASELINE_QUEUE = "baseline"
DEFAULT_QUEUE = "baseline_default"
OURS_QUEUE = "mail"

BASELINE_APP = """\
from celery import Celery

VALUE = {value}

app = Celery("baseline", broker={url!r}, backend={url!r})
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                broker_connection_retry_on_startup=True)


@app.task(name="probe_value")
def probe_value():
    return VALUE
"""

OURS_TASKS = """\
from celery import shared_task

VALUE = {value}


@shared_task(name="probe_value")
def probe_value():
    return VALUE
"""

READY = re.compile(r"\bready in [\d.]+ s")
RELOADED = re.compile(r"\breloaded worker in ([\d.]+) s")
# `up` lines that mean a reload (or the stack) went wrong
TROUBLE = re.compile(r"not reloaded|cannot|restarting in|leftover|Its last lines|Traceback")
ROOT_WARNING = re.compile(r"SecurityWarning|absolutely not recommended|--uid option|User information: uid="
                          r"|_warn_or_raise_security_error|worker \| *$")
REQUEUED = re.compile(r"Requeuing undeliverable message")


class Failure(Exception):
    """The run cannot go on; the message says why (printed without a traceback)."""


class Side:
    """One reloading stack: its module file, its client, its queue and what it has answered."""

    def __init__(self, name: str, module: Path, template: str, url: str, queue: str):
        from celery import Celery

        self.name, self.module, self.template, self.url, self.queue = name, module, template, url, queue
        self.value = 0
        self.write(0)
        self.client = Celery(f"bench-{name}", broker=url, backend=url)
        self.client.conf.update(accept_content=["json"], task_serializer="json", result_serializer="json",
                                broker_connection_retry_on_startup=True)
        self.sent = []  # every probe, to check at the end that none was lost
        self.latencies: list[float] = []
        self.odd: list[str] = []
        self.old_again: list[float | None] = []  # per round: when the old code last answered after the new

    def write(self, value: int) -> None:
        self.module.write_text(self.template.format(value=value, url=self.url))
        self.value = value

    def probe(self, timeout: float):
        """One probe_value task: its result, or None if none came within `timeout`."""
        from celery.exceptions import TimeoutError as ResultTimeout

        result = self.client.send_task("probe_value", queue=self.queue)
        self.sent.append(result)
        try:
            return result.get(timeout=timeout)
        except ResultTimeout:
            return None

    def answers(self, timeout: float) -> None:
        """Until a probe returns the current value (the stack is up and has the current code)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.probe(min(CALL_TIMEOUT, max(0.1, deadline - time.monotonic())))
            if got == self.value:
                return
            if got is not None:
                self.odd.append(f"before a round: answered {got}, expected the current {self.value}")
            if time.monotonic() > deadline:
                raise Failure(f"{self.name}: no answer {self.value} to probe_value within {timeout:.0f} s "
                              f"(last: {got!r})")

    def round(self, value: int) -> float:
        """Save the module with `value`; seconds until a task returns it."""
        old = self.value
        t0 = time.monotonic()
        self.write(value)
        seen = []
        while True:
            got = self.probe(CALL_TIMEOUT)
            now = time.monotonic()
            if got == value:
                latency = now - t0
                break
            if got is not None and got != old:
                self.odd.append(f"value {value}: a probe answered {got} (neither old {old} nor new)")
            seen.append(got)
            if now - t0 > ROUND_TIMEOUT:
                raise Failure(f"{self.name}: the saved VALUE = {value} was not served within {ROUND_TIMEOUT:.0f} s "
                              f"(probes answered: {', '.join(map(repr, seen[-5:]))})")
        old_again = []  # seconds after t0 at which the old code answered once the new one had
        while time.monotonic() - t0 < latency + AFTER:
            after = self.probe(CALL_TIMEOUT)
            if after == old:
                old_again.append(time.monotonic() - t0)
            elif after != value:
                self.odd.append(f"value {value}: after it was served, a probe answered {after!r}")
        if old_again:
            self.odd.append(f"value {value}: first served at +{latency:.3f} s, then the old value {old} came back "
                            f"{len(old_again)}× (last at +{old_again[-1]:.3f} s)")
        self.latencies.append(latency)
        self.old_again.append(old_again[-1] if old_again else None)
        return latency

    def lost(self) -> int:
        """Probes that never got a result (checked once everything has had time to run)."""
        return sum(1 for result in self.sent if not result.ready())


class UpOutput:
    """`dify-local up`'s output, read on a thread: every line kept, with when it arrived."""

    def __init__(self, stream):
        self.lines: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            with self.lock:
                self.lines.append((time.monotonic(), line))

    def since(self, index: int) -> list[str]:
        with self.lock:
            return [line for _, line in self.lines[index:]]

    def count(self) -> int:
        with self.lock:
            return len(self.lines)

    def has(self, pattern: re.Pattern) -> bool:
        return any(pattern.search(line) for line in self.since(0))


def descendants(pid: int) -> set:
    import psutil

    try:
        return set(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return set()


def stop_tree(proc: subprocess.Popen, seen: set, signum: int, timeout: float, what: str) -> list[str]:
    """Stop `proc` with `signum`, then make sure it and every process seen under it are gone.
    Returns what had to be killed (a finding, never silent)."""
    import psutil

    seen |= descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signum)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    killed = []
    if proc.poll() is None:
        killed.append(f"{what} (pid {proc.pid}) did not stop within {timeout:.0f} s")
        seen |= descendants(proc.pid)
        proc.kill()
        proc.wait()
    gone, alive = psutil.wait_procs(list(seen), timeout=10)
    for member in alive:
        try:
            killed.append(f"{what}: pid {member.pid} ({' '.join(member.cmdline())[:100]}) was left behind")
            member.kill()
        except psutil.Error:
            pass
    return killed


@contextmanager
def shielded():
    """Ctrl-C during a stop would leave processes behind: the stop has timeouts of its own."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def baseline_stack(folder: Path, log: Path, findings: list[str], queue: str, fast_start: bool = True):
    celery = BIN / "celery"
    command = (f"{celery} -A app worker -P threads -c 4 -Q {queue} -l WARNING"
               + (" --without-mingle --without-gossip" if fast_start else ""))
    argv = [str(BIN / "watchfiles"), "--filter", "python", command, str(folder)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=folder, env=env(PYTHONPATH=str(folder)), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    seen: set = set()
    try:
        yield proc, seen
    finally:
        with shielded():
            findings += stop_tree(proc, seen, signal.SIGTERM, 30, "watchfiles")


@contextmanager
def ours_stack(project: Path, state: Path, url: str, findings: list[str]):
    argv = [str(BIN / "dify-local"), "up", "--broker", url, "--port", str(free_port()), "--state-dir", str(state),
            "--watch", str(project)]
    proc = subprocess.Popen(argv, cwd=project, env=env(PYTHONPATH=str(project), PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    output = UpOutput(proc.stdout)
    seen: set = set()
    try:
        yield proc, output, seen
    finally:
        with shielded():
            findings += stop_tree(proc, seen, signal.SIGTERM, 60, "dify-local up")
            output.thread.join(5)


def tail(lines: list[str], count: int = 15) -> str:
    return "\n".join(f"    {line}" for line in lines[-count:])


def run(rounds: int) -> int:
    import celery
    import watchfiles

    findings: list[str] = []
    print(f"reload: save → a task returns the new value; {rounds} rounds per side, alternating; "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, Celery {celery.__version__}, "
          f"watchfiles {watchfiles.VERSION}")
    with tempfile.TemporaryDirectory(prefix="bench-reload-") as temp, \
            redis_server(password=PASSWORD) as (server_url, version, _client):
        temp = Path(temp)
        print(f"  redis-server {version} on {server_url.replace(PASSWORD, '****')}")
        base_dir, default_dir, project, state = temp / "baseline", temp / "default", temp / "project", temp / "state"
        for folder in (base_dir, default_dir, project):
            folder.mkdir()
        (project / "Procfile").write_text("worker: dify-local serve worker -I probe_tasks -P threads -c 4 -l WARNING\n")
        baseline = Side("baseline", base_dir / "app.py", BASELINE_APP, f"{server_url}/2", BASELINE_QUEUE)
        default = Side("default", default_dir / "app.py", BASELINE_APP, f"{server_url}/3", DEFAULT_QUEUE)
        ours = Side("ours", project / "probe_tasks.py", OURS_TASKS, f"{server_url}/1", OURS_QUEUE)
        sides = (baseline, default, ours)
        base_log, default_log = temp / "baseline.log", temp / "default.log"
        up_out = None
        print("  starting the baselines (watchfiles + celery worker, with and without Celery's default start-up) "
              "and ours (dify-local up) …")
        try:
            with baseline_stack(base_dir, base_log, findings, BASELINE_QUEUE) as (base_proc, base_seen), \
                    baseline_stack(default_dir, default_log, findings, DEFAULT_QUEUE, fast_start=False) \
                    as (default_proc, default_seen), \
                    ours_stack(project, state, ours.url, findings) as (up_proc, up_out, up_seen):
                try:
                    wait_for(lambda: up_out.has(READY) or up_proc.poll() is not None, 120,
                             "`dify-local up` to be ready")
                except SystemExit as error:
                    raise Failure(f"{error}; its last lines:\n{tail(up_out.since(0))}") from None
                if up_proc.poll() is not None:
                    raise Failure(f"dify-local up exited with status {up_proc.returncode}:\n{tail(up_out.since(0))}")
                print("  ours: " + next(line for line in up_out.since(0) if READY.search(line)).strip())
                for side, log in ((baseline, base_log), (default, default_log)):
                    try:
                        side.answers(60)
                    except Failure as error:
                        raise Failure(f"{error}; its output:\n{tail(log.read_text().splitlines())}") from None
                ours.answers(60)
                print("  all three answer probe_value; measuring")
                value = 100000
                for number in range(1, rounds + 1):
                    order = sides[number % 3:] + sides[:number % 3]  # each side goes first in turn
                    for side in order:
                        time.sleep(SETTLE)
                        up_seen |= descendants(up_proc.pid)
                        base_seen |= descendants(base_proc.pid)
                        default_seen |= descendants(default_proc.pid)
                        side.answers(30)
                        value += 1
                        mark = up_out.count()
                        latency = side.round(value)
                        note = ""
                        if side is ours:
                            time.sleep(0.2)  # the reload line follows the takeover by a moment
                            said = up_out.since(mark)
                            reported = [RELOADED.search(line) for line in said]
                            reported = [match.group(1) for match in reported if match]
                            note = f"  (up: reloaded worker in {', '.join(reported) or '?'} s)"
                        if side.old_again[-1] is not None:
                            note += f"  OLD VALUE AGAIN until +{side.old_again[-1]:.3f} s"
                        print(f"  round {number} {side.name:<8} {latency:6.3f} s{note}", flush=True)
                time.sleep(SETTLE)
                lost = {side.name: side.lost() for side in sides}
        except KeyboardInterrupt:
            print("\nreload: interrupted; every process it started has been stopped", file=sys.stderr)
            for line in findings:
                print(f"reload: {line}", file=sys.stderr)
            return 130
        except Failure as error:
            print(f"reload: {error}", file=sys.stderr)
            for line in findings:
                print(f"reload: {line}", file=sys.stderr)
            if up_out is not None and "dify-local up" not in str(error):
                print("reload: dify-local up's output:\n" + tail(up_out.since(0), 60), file=sys.stderr)
            return 1
    up_lines = up_out.since(0)  # all of it, `up`'s stop included
    for side in sides:
        print(f"  {side.name:<8} per round: " + ", ".join(f"{x:.3f}" for x in side.latencies))
        print(f"  {side.name:<8} median {median(side.latencies):.3f} s, min {min(side.latencies):.3f}, "
              f"max {max(side.latencies):.3f}; probes sent {len(side.sent)}, without a result {lost[side.name]}")
    odd = [f"{side.name}: {text}" for side in sides for text in side.odd] + findings
    odd += [f"{side}: {count} probe(s) never got a result" for side, count in lost.items() if count]
    odd += [f"ours: up said: {line.strip()}" for line in up_lines if TROUBLE.search(line)]
    requeued = sum(1 for line in up_lines if REQUEUED.search(line))
    if requeued:
        print(f"  note: ours' old workers handed back {requeued} message(s) during their warm shutdown "
              "(kombu: 'Requeuing undeliverable message … No consumers'); each probe's result is checked above")
    for line in odd:
        print(f"  ODD {line}")
    if odd:
        after_ready = up_lines[next((i for i, line in enumerate(up_lines) if READY.search(line)), 0):]
        shown = [line for line in after_ready if not ROOT_WARNING.search(line)]
        print("  dify-local up's output from its ready line (Celery's running-as-root warning left out):\n"
              + tail(shown, 80))
    late = [max(latency, old or 0) for latency, old in zip(ours.latencies, ours.old_again, strict=True)]
    if any(old is not None for old in ours.old_again):
        print(f"  ours until the old code also stopped answering: median {median(late):.3f} s "
              f"(ratio {median(late) / median(baseline.latencies):.3f}×)")
    print(f"  ratio ours / default-start baseline (the issue's form, for reference): "
          f"{median(ours.latencies) / median(default.latencies):.3f}×")
    ratio = median(ours.latencies) / median(baseline.latencies)
    print(f"ratio ours / baseline (medians): {ratio:.3f}× (target ≤ {TARGET}×) "
          f"{'OK' if ratio <= TARGET else 'ABOVE TARGET'}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds per side (default 7)")
    options = parser.parse_args()
    if options.rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        sys.exit(run(options.rounds))
    except KeyboardInterrupt:
        print("\nreload: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
