"""The broker's files in the state folder are never reached through a symbolic link (issue 16,
points 4 and 9): a link planted at the append-only log, its compaction's file, a set-aside copy
or the broker's folder itself is refused with one line naming it (or, for a name the broker only
tries, passed over), and the file it points at, outside the folder, is left exactly as it was.
A folder or a FIFO where the log should be is one clear line too, never a traceback or a hang.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from tests.helpers import port_open, wait_until

LISTENING = r"embedded broker \(fakeredis [\d.]+, \w+ read loop\) listening on"
SECRET = b"the victim's content: a file of the user's outside the state folder\n"


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "outside" / "precious.txt"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def broker_folder(project):
    folder = project.state / "broker"
    folder.mkdir(parents=True, mode=0o700)
    return folder


def refused(project, *parts: str) -> str:
    """`serve broker` refuses to start: its one line (the broker never listened)."""
    done = project.run("serve", "broker", timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    assert not port_open(project.broker_port)
    lines = [line for line in output.splitlines() if line.startswith("dify-local: ")]
    assert len(lines) == 1, output
    for part in parts:
        assert part in lines[0], output
    return lines[0]


def start(project):
    proc = project.start("serve", "broker")
    proc.wait_for_line(LISTENING, timeout=60)
    wait_until(lambda: port_open(project.broker_port), 30, "the embedded broker to listen")
    return proc, redis.Redis.from_url(project.broker_url, socket_timeout=30)


def stop(proc) -> None:
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 0, proc.output
    assert "Traceback" not in proc.output, proc.output


@pytest.mark.parametrize("name", ["appendonly.aof", "appendonly.rewrite"])
def test_a_link_at_a_log_path_is_refused_and_its_target_untouched(project, victim, name):
    link = broker_folder(project) / name
    link.symlink_to(victim)
    refused(project, str(link), "symbolic link", "remove the link")
    assert victim.read_bytes() == SECRET
    assert link.is_symlink()  # left for the user to look at


def test_a_link_to_nothing_at_the_log_is_refused_and_nothing_created(project, victim):
    link = broker_folder(project) / "appendonly.aof"
    target = victim.parent / "created-through-the-link"
    link.symlink_to(target)
    refused(project, str(link), "symbolic link")
    assert not target.exists() and list(victim.parent.iterdir()) == [victim]


def test_a_linked_broker_folder_is_refused(project, victim):
    """The folder itself, pointing at a folder of the user's that holds a file of the log's name."""
    outside = victim.parent
    (outside / "appendonly.aof").write_bytes(SECRET)
    project.state.mkdir(parents=True, mode=0o700)
    (project.state / "broker").symlink_to(outside, target_is_directory=True)
    refused(project, str(project.state / "broker"), "symbolic link")
    assert (outside / "appendonly.aof").read_bytes() == SECRET and victim.read_bytes() == SECRET
    assert sorted(path.name for path in outside.iterdir()) == ["appendonly.aof", "precious.txt"]


def test_the_set_aside_copy_never_goes_through_a_link(project, victim):
    """A broken tail goes to appendonly.aof.broken-<time>: links planted at the names of the coming
    minute are passed over (O_EXCL), the tail goes to a name of its own."""
    folder = broker_folder(project)
    whole = b"*2\r\n$6\r\nselect\r\n$1\r\n1\r\n*3\r\n$3\r\nset\r\n$1\r\nk\r\n$1\r\nv\r\n"  # (db 1: broker_url's)
    (folder / "appendonly.aof").write_bytes(whole + b"*3\r\n$3\r\nset")
    now = time.time()
    for second in range(120):
        (folder / f"appendonly.aof.broken-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now + second))}") \
            .symlink_to(victim)
    proc, client = start(project)
    assert client.get("k") == b"v"
    aside = [path for path in folder.glob("appendonly.aof.broken-*") if not path.is_symlink()]
    assert len(aside) == 1 and aside[0].read_bytes() == b"*3\r\n$3\r\nset", proc.output
    assert aside[0].name.rsplit("-", 1)[-1].isdigit() and str(aside[0]) in proc.output
    client.close()
    stop(proc)
    assert victim.read_bytes() == SECRET


def test_links_planted_while_it_runs_are_not_followed(project, victim):
    """At the compaction's file (BGREWRITEAOF refuses, the full log is kept) and over the log
    itself (the compaction's rename replaces the link, never writes through it)."""
    folder = broker_folder(project)
    proc, client = start(project)
    client.set("key", "before")
    (folder / "appendonly.rewrite").symlink_to(victim)
    with pytest.raises(redis.ResponseError, match="could not be written"):
        client.bgrewriteaof()
    proc.wait_for_line(r"cannot compact the append-only log \(\S+/appendonly\.rewrite: .*symbolic link", timeout=30)
    (folder / "appendonly.rewrite").unlink()
    client.set("key", "during")
    os.replace(folder / "appendonly.aof", victim.parent / "moved.aof")
    (folder / "appendonly.aof").symlink_to(victim)
    client.set("key", "after")
    assert client.bgrewriteaof()
    assert not (folder / "appendonly.aof").is_symlink()
    assert victim.read_bytes() == SECRET
    client.close()
    stop(proc)
    assert victim.read_bytes() == SECRET
    proc, client = start(project)
    assert client.get("key") == b"after"
    client.close()
    stop(proc)


@pytest.mark.parametrize("what", ["folder", "fifo"])
def test_something_else_at_the_log_path_is_one_line(project, what):
    path = broker_folder(project) / "appendonly.aof"
    if what == "folder":
        path.mkdir()
        line = refused(project, str(path), "is a folder", "move it away")
    else:
        os.mkfifo(path)
        line = refused(project, str(path), "not a plain file")
    assert "Errno" not in line


def test_a_file_where_the_broker_folder_should_be_is_one_line(project):
    project.state.mkdir(parents=True, mode=0o700)
    (project.state / "broker").write_bytes(b"not a folder")
    refused(project, str(project.state / "broker"), "is a file where", "move it away")
