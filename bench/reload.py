"""Hot-reload latency: `dify-local up` against the usual `watchfiles` + `celery worker` workaround, on two
Celery apps, side by side in one run.

What it measures: from the moment a task module is saved until a task sent afterwards returns the new
code's value. Targets (issue 17): ours at most 0.35× the baseline on the plain app, 0.1× on the heavy one.

The apps:
  plain   one module (`app.py`: a Celery app and task `probe_value` returning a module-level VALUE).
  heavy   bench/heavy_app, Dify-shaped (copied to a temporary folder): `app.py` builds a Flask app from a
          factory with pydantic-settings, SQLAlchemy models, Flask extensions, boto3, openai, numpy/pandas,
          sympy and OpenTelemetry, and exposes `celery` as Dify's `app.celery`; the probe is
          tasks/probe_task.py. Needs the `bench` extra (`pip install -e '.[bench]'`).

For each app, two sides against one real redis-server the script starts (each side its own database):
  baseline  watchfiles --filter python 'celery -A <app> worker -P threads -c 4 --without-mingle
                                        --without-gossip -l WARNING' <folder>
            (without mingle and gossip a plain worker starts about a second sooner: the fairer anchor)
  ours      dify-local up --broker <redis>/<db> --watch <folder> on a Procfile of the same line,
                worker: celery -A <app> worker -P threads -c 4 --without-mingle --without-gossip -l WARNING
            which `up` runs through its bootstrap in the app's interpreter: a spare worker kept warm from
            the start (its libraries imported) loads the new code and takes over.
With --role, a third side on the plain app: our own worker role (`dify-local serve worker -I probe_tasks`).

A round, for one side: check the side answers with its current value; t0; rewrite the module with
`VALUE = <new number>` (a plain write, as an editor saves); then send `probe_value` and wait for its
result (3 s per call; a task sent while no worker consumes waits in its queue), again and again, until a
result carries the new value. Latency = that result's arrival − t0. The sides take turns round by round
(each goes first in turn) and all stacks run the whole time. Rounds are SETTLE seconds apart (3 s, 8 s on
the heavy app: its spare takes seconds to import the libraries again after each reload, and a developer's
saves are seconds apart too). Nothing is discarded: the first round counts. Before each of ours' rounds
`ps` says whether the spare was loaded; its memory (RSS) is printed.

Checks beside the timing: for a second after each new value, more probes check that the old value does
not come back; at the end, every probe sent must have its result (none lost).

Prints every round, each side's median, and per app the ratio of medians ours / baseline.

    .venv/bin/python bench/reload.py [--rounds N] [--apps plain,heavy] [--role]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BIN, env, free_port, median, redis_server, wait_for  # noqa: E402

PASSWORD = "bench-pw"
TARGETS = {"plain": 0.35, "heavy": 0.1}
CALL_TIMEOUT = 3.0  # seconds one probe may wait for its result before another is sent
ROUND_TIMEOUT = 60.0  # seconds a reload may take before the run stops with an error
SETTLE = {"plain": 3.0, "heavy": 8.0}  # seconds between rounds
AFTER = 1.0  # seconds of probes after the new value, each of which must return it too
QUEUE = "celery"  # the apps' default queue (each side has a Redis database of its own)
ROLE_QUEUE = "mail"
HEAVY_APP = Path(__file__).resolve().parent / "heavy_app"
WORKER_ARGS = "worker -P threads -c 4 --without-mingle --without-gossip -l WARNING"

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

HEAVY_PROBE = """\
from celery import shared_task

VALUE = {value}


@shared_task(name="probe_value")
def probe_value():
    return VALUE
"""

ROLE_TASKS = """\
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
def baseline_stack(folder: Path, log: Path, findings: list[str], app: str, url: str):
    command = f"{BIN / 'celery'} -A {app} {WORKER_ARGS}"
    argv = [str(BIN / "watchfiles"), "--filter", "python", command, str(folder)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=folder, env=env(PYTHONPATH=str(folder), CELERY_BROKER_URL=url), stdout=out,
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


def spare(project: Path, state: Path) -> dict | None:
    """The worker's spare as `up` reports it (pid, loaded, RSS), or None."""
    import json

    done = subprocess.run([str(BIN / "dify-local"), "ps", "--json"], cwd=project,
                          env=env(DIFY_LOCAL_STATE_DIR=str(state)), capture_output=True, text=True, timeout=30)
    try:
        spares = json.loads(done.stdout)["reload"]["spares"]
    except (ValueError, KeyError, TypeError):
        return None
    return next((row for row in spares if row["name"] == "worker"), None)


class Stack:
    """One side's stack: how to start it, and (ours) its `up` output and state folder."""

    def __init__(self, side: Side, app: str, kind: str, folder: Path, target: str = "", log: Path | None = None,
                 state: Path | None = None):
        self.side, self.app, self.kind, self.folder, self.log, self.state = side, app, kind, folder, log, state
        self.target = target  # the Celery app, as -A names it
        self.proc = self.output = None
        self.seen: set = set()
        self.spare_ready: list[bool] = []
        self.spare_memory: list[int] = []


def make_sides(temp: Path, server_url: str, apps: list[str], role: bool) -> list[Stack]:
    stacks, db = [], 1
    line = f"worker: celery -A {{app}} {WORKER_ARGS}\n"
    for app in apps:
        for kind in ("baseline", "ours"):
            folder = temp / f"{app}-{kind}"
            if app == "heavy":
                shutil.copytree(HEAVY_APP, folder, ignore=shutil.ignore_patterns("__pycache__"))
                module, template, target = folder / "tasks" / "probe_task.py", HEAVY_PROBE, "app.celery"
            else:
                folder.mkdir()
                module, template, target = folder / "app.py", BASELINE_APP, "app"
            url = f"{server_url}/{db}"
            db += 1
            side = Side(f"{kind}-{app}", module, template, url, QUEUE)
            if kind == "ours":
                (folder / "Procfile").write_text(line.format(app=target))
                stacks.append(Stack(side, app, kind, folder, target, state=temp / f"state-{app}"))
            else:
                stacks.append(Stack(side, app, kind, folder, target, log=temp / f"{app}-baseline.log"))
    if role:
        folder = temp / "plain-role"
        folder.mkdir()
        (folder / "Procfile").write_text("worker: dify-local serve worker -I probe_tasks -P threads -c 4 -l WARNING\n")
        side = Side("role-plain", folder / "probe_tasks.py", ROLE_TASKS, f"{server_url}/{db}", ROLE_QUEUE)
        stacks.append(Stack(side, "plain", "role", folder, state=temp / "state-role"))
    return stacks


def run(rounds: int, apps: list[str], role: bool) -> int:
    import celery
    import watchfiles

    findings: list[str] = []
    print(f"reload: save → a task returns the new value; apps {', '.join(apps)}; {rounds} rounds per side, "
          f"alternating; {os.cpu_count()} CPUs, Python {platform.python_version()}, Celery {celery.__version__}, "
          f"watchfiles {watchfiles.VERSION}")
    with tempfile.TemporaryDirectory(prefix="bench-reload-") as temp, \
            redis_server(password=PASSWORD) as (server_url, version, _client), ExitStack() as running:
        temp = Path(temp)
        print(f"  redis-server {version} on {server_url.replace(PASSWORD, '****')}")
        stacks = make_sides(temp, server_url, apps, role)
        sides = [stack.side for stack in stacks]
        print("  starting " + ", ".join(stack.side.name for stack in stacks) + " …")
        try:
            for stack in stacks:
                if stack.kind == "baseline":
                    stack.proc, stack.seen = running.enter_context(
                        baseline_stack(stack.folder, stack.log, findings, stack.target, stack.side.url))
                else:
                    stack.proc, stack.output, stack.seen = running.enter_context(
                        ours_stack(stack.folder, stack.state, stack.side.url, findings))
            for stack in stacks:
                if stack.output is None:
                    continue
                try:
                    wait_for(lambda stack=stack: stack.output.has(READY) or stack.proc.poll() is not None, 180,
                             f"`dify-local up` ({stack.side.name}) to be ready")
                except SystemExit as error:
                    raise Failure(f"{error}; its last lines:\n{tail(stack.output.since(0))}") from None
                if stack.proc.poll() is not None:
                    raise Failure(f"dify-local up ({stack.side.name}) exited with status {stack.proc.returncode}:\n"
                                  f"{tail(stack.output.since(0))}")
                print(f"  {stack.side.name}: " + next(line for line in stack.output.since(0)
                                                      if READY.search(line)).strip())
            started = time.monotonic()
            for stack in stacks:
                try:
                    stack.side.answers(120)
                except Failure as error:
                    shown = stack.log.read_text().splitlines() if stack.log else stack.output.since(0)
                    raise Failure(f"{error}; its output:\n{tail(shown)}") from None
            print(f"  all {len(stacks)} answer probe_value ({time.monotonic() - started:.1f} s after the last "
                  "ready line); measuring")
            value = 100000
            for number in range(1, rounds + 1):
                order = stacks[number % len(stacks):] + stacks[:number % len(stacks)]  # each goes first in turn
                for stack in order:
                    side = stack.side
                    time.sleep(SETTLE[stack.app])
                    for other in stacks:
                        other.seen |= descendants(other.proc.pid)
                    side.answers(60)
                    note = ""
                    if stack.kind != "baseline":
                        row = spare(stack.folder, stack.state)
                        stack.spare_ready.append(bool(row and row["ready"]))
                        if row and row.get("memory"):
                            stack.spare_memory.append(row["memory"])
                        note = "  (spare loaded)" if stack.spare_ready[-1] else "  (NO SPARE LOADED: cold start)"
                    value += 1
                    mark = stack.output.count() if stack.output else 0
                    latency = side.round(value)
                    if stack.output is not None:
                        time.sleep(0.2)  # the reload line follows the takeover by a moment
                        reported = [RELOADED.search(line) for line in stack.output.since(mark)]
                        reported = [match.group(1) for match in reported if match]
                        note += f"  (up: reloaded worker in {', '.join(reported) or '?'} s)"
                    if side.old_again[-1] is not None:
                        note += f"  OLD VALUE AGAIN until +{side.old_again[-1]:.3f} s"
                    print(f"  round {number} {side.name:<14} {latency:6.3f} s{note}", flush=True)
            time.sleep(3.0)
            lost = {side.name: side.lost() for side in sides}
        except KeyboardInterrupt:
            print("\nreload: interrupted; every process it started is being stopped", file=sys.stderr)
            return 130
        except Failure as error:
            print(f"reload: {error}", file=sys.stderr)
            return 1
        finally:
            with shielded():
                running.close()
            for line in findings:
                print(f"reload: {line}", file=sys.stderr)
    odd = [f"{side.name}: {text}" for side in sides for text in side.odd] + findings
    odd += [f"{side}: {count} probe(s) never got a result" for side, count in lost.items() if count]
    requeued = 0
    for stack in stacks:
        side = stack.side
        print(f"  {side.name:<14} per round: " + ", ".join(f"{x:.3f}" for x in side.latencies))
        print(f"  {side.name:<14} median {median(side.latencies):.3f} s, min {min(side.latencies):.3f}, "
              f"max {max(side.latencies):.3f}; probes sent {len(side.sent)}, without a result {lost[side.name]}")
        if stack.output is not None:
            lines = stack.output.since(0)
            odd += [f"{side.name}: up said: {line.strip()}" for line in lines if TROUBLE.search(line)]
            requeued += sum(1 for line in lines if REQUEUED.search(line))
            if stack.spare_memory:
                print(f"  {side.name:<14} spare loaded before {sum(stack.spare_ready)} of {len(stack.spare_ready)} "
                      f"saves; its memory (RSS with children) {median(stack.spare_memory) / 2**20:.0f} MiB")
    if requeued:
        print(f"  note: ours' old workers handed back {requeued} message(s) during their warm shutdown "
              "(kombu: 'Requeuing undeliverable message … No consumers'); each probe's result is checked above")
    for line in odd:
        print(f"  ODD {line}")
    if odd:
        for stack in stacks:
            if stack.output is not None:
                shown = [line for line in stack.output.since(0) if not ROOT_WARNING.search(line)]
                print(f"  {stack.side.name}: dify-local up's last lines (Celery's running-as-root warning left out):\n"
                      + tail(shown, 40))
    by_name = {stack.side.name: stack.side for stack in stacks}
    for app in apps:
        base, ours = by_name[f"baseline-{app}"], by_name[f"ours-{app}"]
        ratio = median(ours.latencies) / median(base.latencies)
        late = [max(latency, old or 0) for latency, old in zip(ours.latencies, ours.old_again, strict=True)]
        if any(old is not None for old in ours.old_again):
            print(f"  {app}: ours until the old code also stopped answering: median {median(late):.3f} s "
                  f"(ratio {median(late) / median(base.latencies):.3f}×)")
        print(f"ratio ours / baseline on the {app} app (medians {median(ours.latencies):.3f} s / "
              f"{median(base.latencies):.3f} s): {ratio:.3f}× (target ≤ {TARGETS[app]}×) "
              f"{'OK' if ratio <= TARGETS[app] else 'ABOVE TARGET'}")
    if role:
        base, ours = by_name["baseline-plain"], by_name["role-plain"]
        print(f"  our own worker role on the plain app: {median(ours.latencies) / median(base.latencies):.3f}× "
              "(for reference)")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds per side (default 7)")
    parser.add_argument("--apps", default="plain,heavy", help="plain, heavy or both (default plain,heavy)")
    parser.add_argument("--role", action="store_true", help="also our own worker role on the plain app")
    options = parser.parse_args()
    if options.rounds < 1:
        parser.error("--rounds must be at least 1")
    apps = [app.strip() for app in options.apps.split(",") if app.strip()]
    if not apps or any(app not in TARGETS for app in apps):
        parser.error("--apps takes plain, heavy or plain,heavy")
    if options.role and "plain" not in apps:
        parser.error("--role needs the plain app")
    try:
        sys.exit(run(options.rounds, apps, options.role))
    except KeyboardInterrupt:
        print("\nreload: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
