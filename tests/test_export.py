"""`dify-local export`: what it writes runs the Procfile on a real Redis, workers stopped warmly.

The supervisord export is run for real (supervisord from PyPI, Debian's redis-server); systemd and
docker compose cannot run here, so their files are read back and checked."""

from __future__ import annotations

import configparser
import os
import stat
import subprocess

import yaml

from runner.celery_app import create_celery_app
from runner.settings import load_settings
from tests.helpers import BIN, Http, free_port, wait_until


def test_supervisord_export_runs_the_stack_on_real_redis(project, redis_server, tmp_path):
    api_port = free_port()
    out = tmp_path / "supervisord"
    result = project.run("--set", f"DIFY_PORT={api_port}", "export", "supervisord", str(out),
                         "--broker", f"{redis_server}/3", "--app", "shop", "--worker-grace", "30")
    assert result.returncode == 0, result.stderr
    conf = out / "shop.conf"
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600  # it holds the broker's password
    program = configparser.RawConfigParser()
    program.read(conf)
    worker = program["program:worker"]
    assert (worker["stopsignal"], worker["stopwaitsecs"], worker["stopasgroup"], worker["killasgroup"]) == (
        "TERM", "30", "false", "true")
    assert "broker" not in program["group:shop"]["programs"].split(",")  # a real Redis instead
    main_conf = tmp_path / "supervisord.conf"
    main_conf.write_text(
        f"[supervisord]\nnodaemon=true\nlogfile={tmp_path}/supervisord.log\npidfile={tmp_path}/supervisord.pid\n"
        f"childlogdir={tmp_path}\n[unix_http_server]\nfile={tmp_path}/s.sock\n"
        f"[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
        f"[supervisorctl]\nserverurl=unix://{tmp_path}/s.sock\n[include]\nfiles = {out}/*.conf\n")
    supervisord = project.start(argv=[str(BIN / "supervisord"), "-c", str(main_conf)])
    app = create_celery_app(load_settings(project.dir, environ={"CELERY_BROKER_URL": f"{redis_server}/3"}))
    try:
        wait_until(lambda: app.control.ping(timeout=0.5), 60, "the exported worker to answer")
        assert app.tasks["rag_pipeline_run_task"].delay("exported").get(timeout=30)["chunks"] == ["exported"]
        wait_until(lambda: Http(f"http://127.0.0.1:{api_port}").status("/health") == 200, 30, "the exported API")
        stopped = subprocess.run([str(BIN / "supervisorctl"), "-c", str(main_conf), "stop", "shop:worker"],
                                 capture_output=True, text=True, timeout=60)
        assert "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
        log = "".join(path.read_text() for path in tmp_path.glob("worker*.log"))
        assert "Warm shutdown" in log  # TERM to the worker itself, not QUIT
    finally:
        app.close()
        subprocess.run([str(BIN / "supervisorctl"), "-c", str(main_conf), "shutdown"], capture_output=True, timeout=60)
        supervisord.wait(60)


def test_systemd_units_stop_workers_warmly(project):
    result = project.run("export", "systemd", "units", "--scale", "worker=2", "--app", "dify")
    assert result.returncode == 0
    assert "no real Redis is configured" in result.stderr  # and the written settings say where to put it
    units = project.dir / "units"
    names = sorted(path.name for path in units.iterdir())
    assert names == ["dify-api.service", "dify-beat.service", "dify-worker.1.service", "dify-worker.2.service",
                     "dify.env", "dify.target"]
    unit = configparser.RawConfigParser(strict=False)
    unit.optionxform = str
    unit.read(units / "dify-worker.2.service")
    service = unit["Service"]
    assert (service["KillSignal"], service["KillMode"], service["TimeoutStopSec"]) == ("SIGTERM", "mixed", "600")
    text = (units / "dify-worker.2.service").read_text()  # Environment= repeats: read the lines themselves
    assert "Environment=DIFY_LOCAL_PROCESS_NAME=worker.2\n" in text
    assert "serve worker" in service["ExecStart"]
    assert "CELERY_BROKER_URL=redis://:CHANGE-ME@redis-host:6379/1" in (units / "dify.env").read_text()
    assert stat.S_IMODE(os.stat(units / "dify.env").st_mode) == 0o600


def test_compose_file_brings_its_own_redis(project):
    assert project.run("export", "compose", "compose", "--scale", "worker=3", "--app", "dify").returncode == 0
    document = yaml.safe_load((project.dir / "compose" / "compose.yaml").read_text())
    services = document["services"]
    assert set(services) == {"redis", "api", "worker", "beat"}
    worker = services["worker"]
    assert (worker["stop_signal"], worker["stop_grace_period"], worker["deploy"]["replicas"]) == ("SIGTERM", "600s", 3)
    env_file = project.dir / "compose" / "dify.env"
    assert services["redis"]["env_file"] == "dify.env" and stat.S_IMODE(os.stat(env_file).st_mode) == 0o600
    settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if not line.startswith("#"))
    password = settings["REDIS_PASSWORD"]
    assert len(password) >= 20 and settings["CELERY_BROKER_URL"] == f"redis://:{password}@redis:6379/1"
    # the password is in the owner-only env file alone: compose.yaml may be read by anyone
    assert password not in (project.dir / "compose" / "compose.yaml").read_text()
    # the container's shell gives it to redis-server (compose turns $$ into $), and refuses without one
    shim = project.dir / "bin"
    shim.mkdir()
    (shim / "redis-server").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (shim / "redis-server").chmod(0o755)
    argv = [part.replace("$$", "$") for part in services["redis"]["command"]]
    path = {"PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"}
    started = subprocess.run(argv, env={**path, "REDIS_PASSWORD": password}, capture_output=True, text=True)
    assert started.stdout.splitlines() == ["--requirepass", password], started.stderr
    refused = subprocess.run(argv, env=path, capture_output=True, text=True)
    assert refused.returncode != 0 and "set REDIS_PASSWORD in dify.env" in refused.stderr
