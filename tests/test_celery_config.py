"""The Celery app factory turns settings into Celery configuration (no broker needed to check)."""

from __future__ import annotations

import ssl

from runner.celery_app import celery_config
from runner.roles.worker import worker_argv
from runner.settings import load_settings


def config(tmp_path, **environ):
    return celery_config(load_settings(tmp_path, environ=environ, make_password=True))  # as a role loads them


def test_embedded_broker_json_only_and_expiring_results(tmp_path):
    conf = config(tmp_path, REDIS_PORT="7001", CELERY_RESULT_EXPIRES="600")
    password = (tmp_path / ".dify-local" / "broker-password").read_text().strip()  # generated: none was set
    assert conf["broker_url"] == conf["result_backend"] == f"redis://:{password}@127.0.0.1:7001/1"
    assert conf["accept_content"] == ["json"] and conf["result_accept_content"] == ["json"]
    assert conf["task_serializer"] == conf["result_serializer"] == "json"
    assert conf["result_expires"] == 600 and conf["broker_connection_retry_on_startup"] is True
    assert conf["broker_transport_options"] == {"queue_order_strategy": "priority", "visibility_timeout": 960,
                                                "unacked_restore_interval": 2, "unacked_restore_throttle": 1}
    assert conf["result_backend_transport_options"] == {}
    assert "broker_use_ssl" not in conf
    # Dify's two periodic tasks on by default, and dify-local's own housekeeping
    assert set(conf["beat_schedule"]) == {"check_upgradable_plugin_task", "workflow_schedule_poller_task",
                                          "clean_queue_samples_task"}


def test_sentinel_options_as_dify_sets_them(tmp_path):
    url = "sentinel://:pw@s1:26379/1;sentinel://:pw@s2:26379/1"
    conf = config(tmp_path, CELERY_BROKER_URL=url, CELERY_USE_SENTINEL="true", CELERY_SENTINEL_MASTER_NAME="mymaster",
                  CELERY_SENTINEL_PASSWORD="sentinelpass", CELERY_SENTINEL_SOCKET_TIMEOUT="0.5")
    assert conf["broker_url"] == url
    options = conf["broker_transport_options"]
    assert options["master_name"] == "mymaster"
    assert options["sentinel_kwargs"] == {"socket_timeout": 0.5, "password": "sentinelpass"}
    assert conf["result_backend_transport_options"]["master_name"] == "mymaster"


def test_tls_from_the_flag_or_the_scheme(tmp_path):
    for environ in ({"CELERY_BROKER_URL": "redis://r:6379/1", "BROKER_USE_SSL": "true"},
                    {"CELERY_BROKER_URL": "rediss://r:6380/1"}):
        conf = config(tmp_path, **environ)
        assert conf["broker_use_ssl"] == conf["redis_backend_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def test_worker_arguments_from_settings(tmp_path):
    settings = load_settings(tmp_path, environ={"CELERY_WORKER_AMOUNT": "3", "CELERY_QUEUES": "retention,mail,dataset"})
    argv = worker_argv(settings, "w@h")
    assert argv[argv.index("--concurrency") + 1] == "3" and argv[argv.index("--pool") + 1] == "threads"
    assert argv[argv.index("--queues") + 1] == "dataset,mail,retention"
    scaled = load_settings(tmp_path, environ={"CELERY_AUTO_SCALE": "true", "CELERY_MAX_WORKERS": "8",
                                              "CELERY_MIN_WORKERS": "2", "CELERY_WORKER_CLASS": "prefork"})
    argv = worker_argv(scaled, "w@h")
    assert "--autoscale=8,2" in argv and "--concurrency" not in argv and argv[argv.index("--pool") + 1] == "prefork"
    default_floor = load_settings(tmp_path, environ={"CELERY_AUTO_SCALE": "true", "CELERY_WORKER_AMOUNT": "4"})
    assert "--autoscale=4,1" in worker_argv(default_floor, "w@h")
