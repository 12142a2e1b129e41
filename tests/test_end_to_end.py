"""`dify-local up` in an empty folder: one real task through the API to each of the 16 queues, every
result back, Ctrl-C, exit status 0, nothing left running."""

from __future__ import annotations

import signal

from tests.every_queue import run_a_task_on_every_queue


def test_up_runs_a_task_on_every_queue_and_ctrl_c_leaves_nothing(project):
    stack = project.up()
    ready = [line for line in stack.lines if "ready in" in line][-1]
    assert f"API http://127.0.0.1:{project.api_port}" in ready
    assert f"broker redis://:****@127.0.0.1:{project.broker_port}/1 (embedded)" in ready
    assert "16 queues" in ready and "worker threads×" in ready
    assert project.broker_password not in stack.output
    run_a_task_on_every_queue(project)

    pids = stack.tree()
    assert len(pids) >= 5  # the supervisor, broker, api, worker, beat
    stack.signal(signal.SIGINT)
    assert stack.wait(60) == 0, stack.output
    assert stack.alive() == [], f"still running after Ctrl-C: {stack.alive()}\n{stack.output}"
    assert "worker stopped (status 0" in stack.output
