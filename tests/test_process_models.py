"""The same four processes under plain `honcho start`, and `up` against a real Redis (no broker)."""

from __future__ import annotations

import json
import shutil
import signal

import redis

from tests.helpers import REPO, base_env, wait_until


def _worker_answers(broker_url: str) -> bool:
    from runner.celery_app import create_celery_app
    from runner.settings import load_settings

    app = create_celery_app(load_settings(environ={"CELERY_BROKER_URL": broker_url}))
    try:
        return bool(app.control.ping(timeout=1.0))
    finally:
        app.close()


def test_honcho_start_in_the_repo_root_runs_the_four_processes(project):
    honcho = shutil.which("honcho", path=base_env()["PATH"])
    assert honcho, "honcho is a dependency and must be installed"
    env = {**project.env, "DIFY_LOCAL_STATE_DIR": str(project.state)}
    proc = project.start(argv=[honcho, "-d", str(REPO), "-f", str(REPO / "Procfile"), "start"], env=env)
    for name in ("broker", "api", "worker", "beat"):
        proc.wait_for_line(rf"{name}\.1 +\| ", timeout=30)
    wait_until(lambda: project.api.status("/health") == 200, 60, "the API to be healthy")
    wait_until(lambda: _worker_answers(project.broker_url), 60, "the worker to answer a ping")
    client = redis.Redis(port=project.broker_port, password=project.broker_password, db=1)
    wait_until(lambda: client.get("dify-local:beat:heartbeat"), 30, "beat to tick")
    status, sent = project.api.post("/v1/tasks/rag_pipeline_run_task", {"args": ["from honcho"]})
    assert status == 202
    wait_until(lambda: project.api.get(sent["poll"])[1]["state"] == "SUCCESS", 30, "the task to run")
    proc.signal(signal.SIGINT)
    proc.wait(60)
    assert proc.alive() == [], proc.output


def test_up_with_an_external_redis_starts_no_broker(project, redis_server):
    stack = project.up("--broker", f"{redis_server}/2", env={"CELERY_RESULT_EXPIRES": "600"})
    ready = [line for line in stack.lines if "ready in" in line][-1]
    assert "(external)" in ready and "realredispw" not in stack.output
    assert "broker started" not in stack.output and "3 processes" in stack.output
    status, sent = project.api.post("/v1/tasks/send_mail_task", {"args": ["a@b.co", "on real redis", "body"]})
    assert status == 202
    wait_until(lambda: project.api.get(sent["poll"])[1]["state"] == "SUCCESS", 30, "the task to run")
    client = redis.Redis.from_url(f"{redis_server}/2")
    assert json.loads(client.get(f"celery-task-meta-{sent['id']}"))["status"] == "SUCCESS"
    assert 0 < client.ttl(f"celery-task-meta-{sent['id']}") <= 600  # results expire
    stack.signal(signal.SIGINT)
    assert stack.wait(60) == 0
    assert stack.alive() == []
