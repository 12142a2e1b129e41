"""A real Redis instead of the embedded broker, in the two shapes teams run: behind Redis Sentinel
(sentinel://…;sentinel://… with CELERY_USE_SENTINEL) and over TLS (rediss:// with a CA of their
own in REDIS_SSL_CA_CERTS). `up` starts no broker; the API, worker, beat, the supervisor's probes,
the result backend and `broker info` all go through that Redis."""

from __future__ import annotations

import signal

import redis

from tests.helpers import port_open, wait_until

SENTINEL_ENV = {"CELERY_USE_SENTINEL": "true", "CELERY_SENTINEL_MASTER_NAME": "mymaster",
                # Dify's default is 0.1 s; this machine is shared and noisy
                "CELERY_SENTINEL_SOCKET_TIMEOUT": "2"}


def run_task(project) -> str:
    """One task through the API, polled until it succeeds; its id."""
    status, sent = project.api.post("/v1/tasks/process_trace_tasks", {"args": ["app-1", "chat", {"tokens": 3}]})
    assert status == 202, sent

    def finished():
        status, body = project.api.get(sent["poll"])
        assert status == 200 and body["state"] != "FAILURE", body
        return body if body["state"] == "SUCCESS" else None
    body = wait_until(finished, 60, "the task to succeed")
    assert body["result"]["app_id"] == "app-1"
    return sent["id"]


def assert_stack_used(project, stack, server: redis.Redis, shown_url: str) -> None:
    """No embedded broker; a task's message, its result and beat's heartbeat all on `server`."""
    ready = next(line for line in stack.lines if "ready in" in line)
    assert f"broker {shown_url} (external)" in ready, ready
    processes = project.run("ps")
    assert processes.returncode == 0, processes.stderr
    names = [line.split()[0] for line in processes.stdout.splitlines()[1:] if line.strip()]
    assert {"api", "worker", "beat"} <= set(names) and "broker" not in names, processes.stdout
    assert not port_open(project.broker_port)
    status, health = project.api.get("/health")
    assert status == 200 and health["checks"]["broker"]["url"] == shown_url, health

    task_id = run_task(project)
    assert server.exists(f"celery-task-meta-{task_id}")  # the result backend wrote there
    assert server.exists("_kombu.binding.celery")  # the worker's control mailbox is bound there
    assert server.exists("dify-local:beat:heartbeat")  # beat ticks there


def stop(stack) -> None:
    stack.signal(signal.SIGINT)
    assert stack.wait(60) == 0, stack.output
    assert not stack.alive()


def test_up_through_sentinels_uses_their_master(project, redis_sentinel):
    url = redis_sentinel.broker_url()
    stack = project.up("--broker", url, env=SENTINEL_ENV)
    master = redis.Redis(port=redis_sentinel.master_port, password=redis_sentinel.password, db=1)
    try:
        shown = ";".join(f"sentinel://:****@127.0.0.1:{port}/1" for port in redis_sentinel.sentinel_ports)
        assert_stack_used(project, stack, master, shown)
        assert redis_sentinel.password not in stack.output

        info = project.run("broker", "info", env={**SENTINEL_ENV, "CELERY_BROKER_URL": url})
        assert info.returncode == 0, info.stderr
        assert f"address      127.0.0.1:{redis_sentinel.master_port}" in info.stdout
        assert "(standalone, master)" in info.stdout and redis_sentinel.password not in info.stdout
        stop(stack)
    finally:
        master.close()


def test_sentinel_mistakes_are_one_clear_line(project, redis_sentinel):
    no_password = project.run("broker", "info",
                              env={**SENTINEL_ENV, "CELERY_BROKER_URL": redis_sentinel.broker_url("")})
    assert no_password.returncode == 1 and "Traceback" not in no_password.stderr
    assert "asks for a password" in no_password.stderr and "sentinel://:PASSWORD@" in no_password.stderr

    other_name = project.run("broker", "info", env={**SENTINEL_ENV, "CELERY_BROKER_URL": redis_sentinel.broker_url(),
                                                    "CELERY_SENTINEL_MASTER_NAME": "othermaster"})
    assert other_name.returncode == 1 and "Traceback" not in other_name.stderr
    assert "No master found for 'othermaster'" in other_name.stderr
    assert "CELERY_SENTINEL_MASTER_NAME" in other_name.stderr and redis_sentinel.password not in other_name.stderr


def test_up_over_tls_with_a_ca_of_our_own(project, redis_tls):
    env = {"REDIS_SSL_CA_CERTS": str(redis_tls.ca)}
    stack = project.up("--broker", redis_tls.broker_url(), env=env)
    server = redis.Redis(port=redis_tls.port, password=redis_tls.password, db=1, ssl=True,
                         ssl_ca_certs=str(redis_tls.ca))
    try:
        assert_stack_used(project, stack, server, f"rediss://:****@127.0.0.1:{redis_tls.port}/1")

        info = project.run("broker", "info", env={**env, "CELERY_BROKER_URL": redis_tls.broker_url()})
        assert info.returncode == 0, info.stderr
        assert f"address      127.0.0.1:{redis_tls.port}" in info.stdout and "Redis " in info.stdout
        stop(stack)
    finally:
        server.close()


def test_tls_without_the_ca_fails_fast_and_says_which_setting(project, redis_tls):
    env = {"CELERY_BROKER_URL": redis_tls.broker_url()}
    info = project.run("broker", "info", env=env)
    assert info.returncode == 1 and "Traceback" not in info.stderr
    assert "certificate verify failed" in info.stderr and "REDIS_SSL_CA_CERTS" in info.stderr
    assert f"rediss://:****@127.0.0.1:{redis_tls.port}/1" in info.stderr

    # A role stops at once instead of waiting out its minute for a broker that will never do.
    worker = project.run("serve", "worker", env=env, timeout=45)
    assert worker.returncode == 1, worker.stdout + worker.stderr
    assert "certificate verify failed" in worker.stderr and "REDIS_SSL_CA_CERTS" in worker.stderr

    # The port speaks TLS only: plain redis:// is told so.
    plain = project.run("broker", "info", env={"CELERY_BROKER_URL": redis_tls.broker_url().replace("rediss", "redis"),
                                               "REDIS_SSL_CA_CERTS": str(redis_tls.ca)})
    assert plain.returncode == 1 and "Traceback" not in plain.stderr and "rediss://" in plain.stderr


def test_tls_files_are_checked_before_anything_starts(project, tmp_path):
    url = "rediss://:pw@127.0.0.1:6390/1"
    missing = project.run("config", env={"CELERY_BROKER_URL": url, "REDIS_SSL_CA_CERTS": "certs/ca.pem"})
    assert missing.returncode == 2
    assert f"REDIS_SSL_CA_CERTS={str(project.dir / 'certs/ca.pem')!r} is not allowed: no such file" in missing.stderr
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("not a certificate\n")
    bad = project.run("config", env={"CELERY_BROKER_URL": url, "REDIS_SSL_CA_CERTS": str(not_pem)})
    assert bad.returncode == 2 and "it does not load" in bad.stderr and "Traceback" not in bad.stderr
    key_alone = project.run("config", env={"CELERY_BROKER_URL": url, "REDIS_SSL_KEYFILE": str(not_pem)})
    assert key_alone.returncode == 2 and "REDIS_SSL_KEYFILE" in key_alone.stderr
    # Without TLS the files are not used, so a Dify .env naming paths of another machine still works.
    assert project.run("config", env={"REDIS_SSL_CA_CERTS": "/elsewhere/ca.pem"}).returncode == 0


def test_up_stops_before_starting_anything_when_the_real_broker_refuses_us(project, redis_server, redis_tls):
    wrong = project.run("up", "--broker", redis_server.replace("realredispw", "guessed") + "/1", timeout=60)
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert wrong.stderr.strip().splitlines() == [
        f"dify-local: cannot use the broker at {redis_server.replace('realredispw', '****')}/1: the password was "
        "refused; check the password in CELERY_BROKER_URL (redis://:PASSWORD@host:port/db)"]
    assert "started" not in wrong.stdout and not project.state.joinpath("metadata.db").exists()

    untrusted = project.run("up", "--broker", redis_tls.broker_url(), timeout=60)
    assert untrusted.returncode == 1 and "REDIS_SSL_CA_CERTS" in untrusted.stderr
    assert len(untrusted.stderr.strip().splitlines()) == 1
