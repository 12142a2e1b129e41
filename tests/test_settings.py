"""Settings: every invalid value stops the command before anything starts (exit 2, one line naming
the variable, the value and what is allowed); precedence; secrets masked."""

from __future__ import annotations

import json

import pytest

from tests.helpers import port_open

INVALID = [
    # (environment, the text the error must contain)
    ({"CELERY_WORKER_CLASS": "eventlet"}, "CELERY_WORKER_CLASS='eventlet'"),
    ({"CELERY_WORKER_AMOUNT": "two"}, "CELERY_WORKER_AMOUNT='two'"),
    ({"CELERY_WORKER_AMOUNT": "-3"}, "CELERY_WORKER_AMOUNT='-3'"),
    ({"CELERY_WORKER_AMOUNT": "0"}, "CELERY_WORKER_AMOUNT='0'"),
    ({"CELERY_MAX_WORKERS": "2.5"}, "CELERY_MAX_WORKERS='2.5'"),
    ({"CELERY_MIN_WORKERS": "-1"}, "CELERY_MIN_WORKERS='-1'"),
    ({"CELERY_AUTO_SCALE": "true", "CELERY_MIN_WORKERS": "5", "CELERY_MAX_WORKERS": "2"},
     "CELERY_MIN_WORKERS=5 is more than CELERY_MAX_WORKERS=2"),
    ({"CELERY_BROKER_URL": "amqp://guest@localhost//"}, "CELERY_BROKER_URL='amqp://guest@localhost//'"),
    ({"CELERY_BROKER_URL": "localhost:6379"}, "CELERY_BROKER_URL='localhost:6379'"),
    ({"CELERY_QUEUES": "dataset,data sets"}, "CELERY_QUEUES='dataset,data sets'"),  # any app's names, but names
    ({"CELERY_USE_SENTINEL": "true", "CELERY_BROKER_URL": "sentinel://localhost:26379"},
     "CELERY_SENTINEL_MASTER_NAME=''"),
    ({"CELERY_USE_SENTINEL": "true", "CELERY_SENTINEL_MASTER_NAME": "mymaster"}, "CELERY_BROKER_URL="),
    ({"CELERY_BROKER_URL": "sentinel://localhost:26379"}, "CELERY_USE_SENTINEL=false"),
    ({"CELERY_SENTINEL_SOCKET_TIMEOUT": "0"}, "CELERY_SENTINEL_SOCKET_TIMEOUT='0'"),
    ({"BROKER_USE_SSL": "maybe"}, "BROKER_USE_SSL='maybe'"),
    ({"BROKER_USE_SSL": "true"}, "BROKER_USE_SSL=true is not allowed with the embedded broker"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL='LOUD'"),
    ({"LOG_FILE_MAX_SIZE": "0"}, "LOG_FILE_MAX_SIZE='0'"),
    ({"DIFY_PORT": "70000"}, "DIFY_PORT='70000'"),
    ({"REDIS_HOST": "example.org"}, "REDIS_HOST='example.org'"),
    ({"QUEUE_MONITOR_ALERT_EMAILS": "ops@example.com,nobody"}, "QUEUE_MONITOR_ALERT_EMAILS="),
    ({"MODE": "scheduler"}, "MODE='scheduler'"),
    ({"ENABLE_CLEAN_MESSAGES": "sometimes"}, "ENABLE_CLEAN_MESSAGES='sometimes'"),
    ({"WORKFLOW_SCHEDULE_MAX_DISPATCH_PER_TICK": "-1"}, "WORKFLOW_SCHEDULE_MAX_DISPATCH_PER_TICK='-1'"),
    ({"SERVER_WORKER_CONNECTIONS": "100000"}, "SERVER_WORKER_CONNECTIONS='100000'"),  # a thread each
]


@pytest.mark.parametrize("environment,expected", INVALID, ids=[next(iter(case[0])) + "=" + next(iter(case[0].values()))
                                                               for case in INVALID])
def test_invalid_setting_stops_up_before_anything_starts(project, environment, expected):
    result = project.run("up", env=environment, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0], lines[0]
    assert "allowed" in lines[0] or "must" in lines[0] or "set " in lines[0] or "name " in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""  # nothing was started, so nothing printed
    assert not project.state.exists()
    assert not port_open(project.broker_port) and not port_open(project.api_port)


def test_bad_value_in_local_config_names_the_file_and_line(project):
    (project.dir / "local_config").mkdir()
    (project.dir / "local_config" / "local.env").write_text("# mine\nCELERY_WORKER_AMOUNT=many\n")
    result = project.run("config")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "dify-local: CELERY_WORKER_AMOUNT='many' (local_config/local.env:2) is not allowed: a whole number, 1 or more")


def test_malformed_local_config_line_is_named(project):
    (project.dir / "local_config").mkdir()
    (project.dir / "local_config" / "local.env").write_text("CELERY_WORKER_AMOUNT 3\n")
    result = project.run("config")
    assert result.returncode == 2
    assert "local.env:1: expected NAME=value" in result.stderr


def test_command_line_flags_are_validated_too(project):
    result = project.run("serve", "worker", "-c", "lots")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "dify-local: CELERY_WORKER_AMOUNT='lots' (command line (-c)) is not allowed: a whole number, 1 or more")
    result = project.run("serve", "worker", "-Q", "dataset,nope")
    assert result.returncode == 2 and "unknown queue 'nope'" in result.stderr
    result = project.run("serve", "worker", "--autoscale", "8")
    assert result.returncode == 2 and "--autoscale='8'" in result.stderr
    result = project.run("--set", "CELERY_WORKERS=3", "config")
    assert result.returncode == 2 and "CELERY_WORKERS is not a setting" in result.stderr


def _config(project, *args, env=None) -> dict:
    result = project.run(*args, "config", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return {item["name"]: item for item in json.loads(result.stdout)["settings"]}


def test_precedence_defaults_local_config_environment_command_line(project):
    assert _config(project)["CELERY_WORKER_AMOUNT"]["source"] == "default (this machine's CPU count)"
    (project.dir / "local_config").mkdir()
    (project.dir / "local_config" / "local.env").write_text("CELERY_WORKER_AMOUNT=3\nLOG_LEVEL=debug\n")
    item = _config(project)["CELERY_WORKER_AMOUNT"]
    assert (item["value"], item["source"]) == ("3", "local_config/local.env:1")
    assert _config(project)["LOG_LEVEL"]["value"] == "DEBUG"
    item = _config(project, env={"CELERY_WORKER_AMOUNT": "4"})["CELERY_WORKER_AMOUNT"]
    assert (item["value"], item["source"]) == ("4", "environment")
    item = _config(project, "--set", "CELERY_WORKER_AMOUNT=5",
                   env={"CELERY_WORKER_AMOUNT": "4"})["CELERY_WORKER_AMOUNT"]
    assert (item["value"], item["source"]) == ("5", "command line (--set)")
    # blank means unset, as in Dify's .env.example
    item = _config(project, env={"CELERY_WORKER_CLASS": ""})["CELERY_WORKER_CLASS"]
    assert (item["value"], item["source"]) == ("threads", "default (empty in environment)")


def test_every_setting_is_printed_with_its_source(project):
    from runner.settings import SETTINGS

    result = project.run("config")
    assert result.returncode == 0
    for setting in SETTINGS:
        assert setting.name in result.stdout
    # a fresh folder: no broker has made its password yet, and `config` makes none
    assert "broker in use: redis://127.0.0.1:" in result.stdout and not project.state.exists()


def test_secrets_are_masked_wherever_printed(project):
    env = {"CELERY_BROKER_URL": "redis://:hunter2@127.0.0.1:6390/1", "REDIS_PASSWORD": "sekret-pw",
           "CELERY_SENTINEL_PASSWORD": "sentinel-pw"}
    for args in (("config",), ("config", "--json")):
        result = project.run(*args, env=env)
        assert result.returncode == 0
        for secret in env.values():
            assert secret not in result.stdout
        assert "redis://:****@127.0.0.1:6390/1" in result.stdout
    bad = project.run("config", env={"CELERY_BROKER_URL": "amqp://:hunter2@rabbit//"})
    assert bad.returncode == 2 and "hunter2" not in bad.stderr and "amqp://:****@rabbit//" in bad.stderr
    bad = project.run("config", env={"CELERY_BROKER_URL": "redis://:hunter2@host:notaport/1"})
    assert bad.returncode == 2 and "hunter2" not in bad.stderr


def test_defaults_file_matches_the_settings_table():
    from runner.settings.reference import render_defaults_env
    from tests.helpers import REPO

    assert (REPO / "local_config" / "defaults.env").read_text() == render_defaults_env(), \
        "regenerate local_config/defaults.env from runner.settings.reference.render_defaults_env()"


@pytest.mark.parametrize("command", [("config",), ("up",), ("export", "compose", "out")])
def test_an_env_file_without_end_is_refused_at_its_cap(project, command):
    """`-e /dev/zero` read until the OOM killer: every file of NAME=value lines is read at most 1 MiB."""
    result = project.run("-e", "/dev/zero", *command)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "dify-local: /dev/zero holds more than 1 MiB; an env file (NAME=value lines) " \
                                    "may have at most that"


def test_oversized_env_files_are_refused_naming_the_file(project):
    (project.dir / ".env").write_text("A=1\n" * 300_000)
    result = project.run("config")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{project.dir / '.env'} is 1200000 bytes; an env file (NAME=value lines) may have at most 1 MiB" \
        in result.stderr
    (project.dir / ".env").unlink()
    (project.dir / "local_config").mkdir()
    (project.dir / "local_config" / "big.env").write_text("# x\n" * 300_000)
    result = project.run("config")
    assert result.returncode == 2 and "local_config/big.env is 1200000 bytes" in result.stderr, result.stderr
