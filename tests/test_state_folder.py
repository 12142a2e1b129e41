"""The state folder is ours alone (issue 16, point 4): one `up`, one broker and one beat at a
time on it (flock), created owner-only, tightened when it is ours and open, refused when it is not
ours."""

from __future__ import annotations

import os
import re
import signal
import stat
import sys

import pytest
import redis

from tests.helpers import Proc, base_env, free_port, port_open, wait_until

UNREACHABLE = "redis://127.0.0.1:1/0"  # a broker URL that nothing serves: `up` starts no broker


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_two_ups_started_at_the_same_instant_one_runs_and_the_other_names_it(project):
    """Both passed the "already running" check in 2 of 5 tries (it asked the control socket,
    which the first had not opened yet)."""
    (project.dir / "Procfile").write_text("idle: sleep 600\n")
    for attempt in range(6):
        ups = [project.start("up", "--no-reload"), project.start("up", "--no-reload")]

        def settled(ups=ups):
            exited = [proc for proc in ups if proc.popen.poll() is not None]
            ready = [proc for proc in ups if "ready in" in proc.output]
            return (exited and ready) or len(exited) == 2
        wait_until(settled, 90, f"one `up` to run and the other to stop (attempt {attempt + 1})")
        loser = next(proc for proc in ups if proc.popen.poll() is not None)
        winner = next(proc for proc in ups if proc is not loser)
        assert winner.popen.poll() is None, f"attempt {attempt + 1}: both stopped:\n{loser.output}\n{winner.output}"
        assert loser.popen.returncode == 1, loser.output
        refused = re.fullmatch(r"dify-local: the state folder .* is in use by `up` \(pid (\d+)\): .*", loser.output)
        assert refused and int(refused.group(1)) == winner.popen.pid, loser.output
        winner.signal(signal.SIGINT)
        assert winner.wait(60) == 0
        assert winner.alive() == []


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, sys.argv[2].encode())
print("holding", flush=True)
time.sleep(float(sys.argv[3]))
"""


def test_up_waits_while_the_watchdog_of_a_killed_up_still_holds_the_folder(project):
    """The watchdog of a killed `up` keeps its lock until it has stopped what that `up` started
    (seconds): the next `up` waits for it, rather than fail on their ports; it gives up after
    GONE_HOLDER_WAIT with one line. The holder here writes the identity of a process that is not
    running ("1:0": pid 1 started at another time), as the dead `up`'s is."""
    project.state.mkdir(mode=0o700)
    (project.dir / "Procfile").write_text("idle: sleep 600\n")
    argv = [sys.executable, "-c", HOLDER, str(project.state / "up.lock"), "1:0"]
    stuck = Proc([*argv, "60"], project.dir, base_env())
    project.procs.append(stuck)
    stuck.wait_for_line("holding", timeout=30)
    refused = project.run("up", "--no-reload", "--broker", UNREACHABLE, timeout=60)
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.splitlines()[-1].startswith(
        f"dify-local: the state folder {project.state} is still locked by what `up` (pid 1), which is gone, left")
    stuck.cleanup()
    brief = Proc([*argv, "3"], project.dir, base_env())
    project.procs.append(brief)
    brief.wait_for_line("holding", timeout=30)
    stack = project.up("idle", "--no-reload", "--broker", UNREACHABLE)  # named: not our API, which waits on a broker
    assert "waiting for the processes of the previous `up` (pid 1, which is gone) to stop" in stack.output
    assert brief.popen.poll() is not None  # it started once the lock was free


def test_a_second_broker_on_a_live_state_folder_is_refused_and_the_live_one_keeps_its_log(project):
    """A second `serve broker` on the folder of a running one loaded and rewrote the same log,
    detaching the live broker from it."""
    live = project.serve_broker()
    other = free_port()
    second = project.run("serve", "broker", "--port", str(other), timeout=30)
    assert second.returncode == 1, second.stderr
    assert second.stderr.count("\n") == 1 and f"in use by a broker (pid {live.popen.pid})" in second.stderr
    assert not port_open(other)
    client = redis.Redis.from_url(project.broker_url)
    try:
        client.set("written-after-the-second-broker", "kept")
    finally:
        client.close()
    log = project.state / "broker" / "appendonly.aof"
    wait_until(lambda: b"written-after-the-second-broker" in log.read_bytes(), 10, "the write in the live log")
    # and `up` on the same folder says so before it starts anything
    up = project.run("up", "--broker-port", str(free_port()), timeout=30)
    assert up.returncode == 1 and f"in use by a broker (pid {live.popen.pid})" in up.stderr, up.stderr
    assert live.popen.poll() is None


def test_a_second_beat_on_a_live_state_folder_is_refused(project):
    """Two beats on one folder shared its schedule file and sent every periodic task twice."""
    project.serve_broker()
    live = project.start("serve", "beat")
    live.wait_for_line("beat: Starting", timeout=60)
    second = project.run("serve", "beat", timeout=60)
    assert second.returncode == 1 and f"in use by beat (pid {live.popen.pid})" in second.stderr, second.stderr
    assert second.stderr.splitlines()[-1].startswith("dify-local: the state folder")
    assert live.popen.poll() is None


def test_the_state_folder_is_created_owner_only_whoever_creates_it(project):
    assert project.run("migrate").returncode == 0  # it opens the database first
    assert mode(project.state) == 0o700


def test_a_state_folder_of_ours_open_to_others_is_made_owner_only_and_says_so(project):
    project.state.mkdir()
    (project.state / "logs").mkdir()
    os.chmod(project.state, 0o777)
    (project.dir / "Procfile").write_text("idle: sleep 600\n")
    stack = project.up("idle", "--no-reload", "--broker", UNREACHABLE)  # named: not our API, which waits on a broker
    assert mode(project.state) == 0o700
    line = f"the state folder {project.state} was open to others (mode 0777): made it owner-only (0700)"
    assert line in stack.output


def test_a_state_folder_we_must_not_use_is_refused_with_one_line(project, tmp_path):
    (project.dir / "Procfile").write_text("idle: sleep 600\n")
    # under a folder every user may write to (no sticky bit): anyone could swap it for theirs
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    result = project.run("up", "--broker", UNREACHABLE, "--state-dir", str(shared / "state"), timeout=30)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{shared} is writable by every user" in result.stderr
    # a folder shared on purpose (/tmp's sticky bit): not ours to tighten
    os.chmod(shared, 0o1777)
    result = project.run("up", "--broker", UNREACHABLE, "--state-dir", str(shared), timeout=30)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert mode(shared) == 0o1777
    # a folder with files of its own that are not ours (the project folder itself)
    (project.dir / "notes.txt").write_text("mine")
    os.chmod(project.dir, 0o755)
    result = project.run("up", "--broker", UNREACHABLE, "--state-dir", str(project.dir), timeout=30)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert mode(project.dir) == 0o755
    # a lock file that is a symlink: refused, its target left alone
    project.state.mkdir(mode=0o700)
    target = tmp_path / "target"
    target.write_text("precious")
    (project.state / "up.lock").symlink_to(target)
    result = project.run("up", "--broker", UNREACHABLE, timeout=30)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "symbolic link" in result.stderr, \
        result.stderr
    assert target.read_text() == "precious"
    if os.geteuid() == 0:  # another user's folder (only root can make one here)
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        result = project.run("up", "--broker", UNREACHABLE, "--state-dir", str(theirs), timeout=30)
        assert result.returncode == 2 and "belongs to" in result.stderr, result.stderr
    else:
        pytest.skip("only root can give a folder to another user")
