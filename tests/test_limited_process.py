"""runner.limited_process: a function run in a forked child under memory, CPU and output limits,
each reached limit one line naming it; the child's own errors come back by name; a child never
outlives its caller, nor holds another call's pipe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import socket
import textwrap

import psutil
import pytest

from runner import limited_process
from tests.helpers import REPO, wait_until

LIMITS = limited_process.Limits(memory=128 << 20, cpu_seconds=2, max_result=1 << 20,
                                memory_setting="MEMORY_SETTING", time_setting="TIME_SETTING")


def doubled(value):
    return {"doubled": value * 2}


def hog():
    return len(bytearray(1 << 30))


def spin():
    while True:
        pass


def refuse():
    raise ValueError("no such thing")


def chatty():
    return "a" * (2 << 20)


def crash():
    os.kill(os.getpid(), signal.SIGSEGV)


@pytest.mark.parametrize("function, words", [
    (hog, "needed more than 128 MB of memory (MEMORY_SETTING)"),
    (spin, "took more than 2 s of CPU (TIME_SETTING)"),
    (chatty, "produced more than 1048576 bytes"),
    (crash, "crashed (SIGSEGV)"),
], ids=["memory", "cpu", "output", "crash"])
def test_each_limit_is_one_line_naming_it(function, words):
    with pytest.raises(limited_process.LimitReached) as reached:
        limited_process.run(function, (), LIMITS, "the job")
    assert str(reached.value) == f"the job {words}"


def test_results_and_errors_come_back():
    assert limited_process.run(doubled, (21,), LIMITS, "the job") == {"doubled": 42}
    with pytest.raises(limited_process.ChildError) as failed:
        limited_process.run(refuse, (), LIMITS, "the job")
    assert failed.value.kind == "ValueError" and str(failed.value) == "no such thing"


def open_descriptors() -> list[int]:
    return sorted(int(name) for name in os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_the_child_holds_nothing_of_its_caller_but_its_pipe():
    """A listening socket (or another call's pipe, a database file) of the caller is closed in the
    child: a child left running must not keep a port bound, nor another call waiting for EOF."""
    with socket.create_server(("127.0.0.1", 0)) as listening:
        inside = limited_process.run(open_descriptors, (), LIMITS, "the job")
    assert listening.fileno() not in inside
    assert len([fd for fd in inside if fd > 2]) <= 2, inside  # its pipe, and the listing's own


def test_the_child_dies_with_its_caller(tmp_path):
    caller = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from runner import limited_process
        from tests.test_limited_process import spin
        limits = limited_process.Limits(memory=64 << 20, cpu_seconds=60, max_result=1024)
        print("calling", flush=True)
        limited_process.run(spin, (), limits, "spin")
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = None
    try:
        assert caller.stdout.readline().strip() == "calling"
        child = wait_until(lambda: psutil.Process(caller.pid).children(), 10, "the limited child")[0]
        caller.kill()
        caller.wait(10)
        wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 10,
                   "the child to die with its caller")
    finally:
        caller.kill()
        if child is not None and child.is_running():
            child.kill()
