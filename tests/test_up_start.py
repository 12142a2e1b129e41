"""How `up` starts: in order, and it gives up cleanly when the broker cannot start."""

from __future__ import annotations



def test_broker_that_cannot_start_stops_up(project):
    # 192.0.2.1 (TEST-NET-1) is no address of this machine, so the broker cannot bind it (a password
    # of its own: the default one is refused off loopback before any bind)
    (project.dir / "Procfile").write_text("broker: dify-local serve broker --host 192.0.2.1 --password secret\n"
                                          "api: dify-local serve api\nworker: dify-local serve worker\n"
                                          "web: python3 -m http.server 0\n")
    proc = project.start("up")
    assert proc.wait(60) == 1, proc.output
    assert "cannot listen on 192.0.2.1" in proc.output
    assert "broker exited with status 1 before it was ready" in proc.output
    assert "the broker did not start, so nothing else can: stopping" in proc.output
    # our roles start with the broker and wait for it; another project's waits for the broker
    assert "worker started" in proc.output and "web started" not in proc.output
    assert "worker ready" not in proc.output and "api ready" not in proc.output
    assert proc.alive() == []


def test_unknown_process_name_is_refused(project):
    result = project.run("up", "api", "workers")
    assert result.returncode == 2
    assert "no process 'workers' in the built-in Procfile; it has: broker, api, worker, beat" in result.stderr


def test_passwords_in_procfile_commands_are_masked(project):
    (project.dir / "Procfile").write_text(
        f"broker: dify-local serve broker --password s3cret-pw --port {project.broker_port}\n"
        f"pinger: python3 -c 'import time; time.sleep(60)' redis://:url-pw@127.0.0.1:1/1\n")
    stack = project.up(env={"REDIS_PASSWORD": "s3cret-pw"})
    assert "serve broker --password **** --port" in stack.output
    assert "s3cret-pw" not in stack.output and "url-pw" not in stack.output
