"""The topology: 16 queues as in the seed, a route for every task, and `up` refusing a Procfile
that leaves a routed queue without a consumer."""

from __future__ import annotations

import json

from runner import topology
from runner.beat_schedule import PERIODIC_TASKS
from runner.celery_app import create_celery_app
from runner.settings import load_settings
from runner.supervisor.procfile import DEFAULT_PROCFILE, describe
from tests.helpers import REPO

SEED_QUEUES = ("dataset,priority_dataset,priority_pipeline,pipeline,mail,ops_trace,app_deletion,plugin,"
               "workflow_storage,conversation,workflow,schedule_poller,schedule_executor,"
               "triggered_workflow_dispatcher,trigger_refresh_executor,retention").split(",")


def test_sixteen_queues_of_the_seed_with_their_classes():
    assert sorted(topology.QUEUE_NAMES) == sorted(SEED_QUEUES)
    classes = {queue.name: queue.priority.label for queue in topology.QUEUES}
    assert {name for name, label in classes.items() if label == "high"} == {"priority_dataset", "priority_pipeline"}
    assert {name for name, label in classes.items() if label == "low"} == {"retention"}


def test_every_task_has_a_route_and_every_route_a_task(tmp_path):
    app = create_celery_app(load_settings(tmp_path, environ={}))
    # the project's own tasks (a test may have registered shared tasks of its own in this process)
    ours = {name for name, task in app.tasks.items() if task.__module__.startswith("runner.")}
    assert ours == set(topology.ROUTES)
    assert set(topology.ROUTES.values()) == set(topology.QUEUE_NAMES)  # every queue has work
    for periodic in PERIODIC_TASKS:
        assert periodic.task in topology.ROUTES


def test_periodic_tasks_match_the_seed(tmp_path):
    settings = load_settings(tmp_path, environ={})
    seed = {"clean_embedding_cache_task": ("ops_trace", False), "clean_unused_datasets_task": ("dataset", False),
            "create_tidb_serverless_task": ("dataset", False), "update_tidb_serverless_status_task": ("dataset", False),
            "clean_messages": ("conversation", False), "mail_clean_document_notify_task": ("mail", False),
            "datasets_queue_monitor": ("ops_trace", False), "check_upgradable_plugin_task": ("plugin", True),
            "workflow_schedule_poller_task": ("schedule_poller", True)}
    assert {p.task: (p.queue, getattr(settings, p.flag)) for p in PERIODIC_TASKS} == seed


def test_consumption_order_is_by_class_whatever_the_order_given():
    assert topology.consumption_order(["retention", "mail", "dataset", "priority_dataset"]) == (
        "priority_dataset", "dataset", "mail", "retention")
    assert topology.consumption_order(["mine", "retention", "priority_pipeline"]) == (
        "priority_pipeline", "mine", "retention")
    assert topology.consumption_order(SEED_QUEUES)[:2] == ("priority_dataset", "priority_pipeline")


def test_root_procfile_is_the_built_in_one():
    assert (REPO / "Procfile").read_text() == DEFAULT_PROCFILE
    roles = [describe(*line.split(": ", 1)).role for line in DEFAULT_PROCFILE.splitlines()]
    assert roles == ["broker", "api", "worker", "beat"]


def test_procfile_lines_are_understood():
    spec = describe("w", "dify-local serve worker -Q mail,dataset -n mail@%h -c 2")
    assert (spec.role, spec.queues, spec.hostname) == ("worker", ("mail", "dataset"), "mail@%h")
    assert describe("c", "celery -A runner.app.celery worker --queues=plugin").queues == ("plugin",)
    assert describe("b", "celery -A proj beat").role == "beat"
    assert describe("web", "python -m http.server").role is None


def test_topology_command_shows_queues_tasks_and_consumers(project):
    result = project.run("topology")
    assert result.returncode == 0, result.stderr
    for name in topology.QUEUE_NAMES:
        assert name in result.stdout
    assert "priority_document_indexing_task" in result.stdout and "NOBODY" not in result.stdout
    (project.dir / "Procfile").write_text("api: dify-local serve api\n"
                                          "fast: dify-local serve worker -Q priority_dataset,priority_pipeline\n"
                                          "slow: dify-local serve worker -Q "
                                          + ",".join(q for q in SEED_QUEUES if not q.startswith("priority_")) + "\n")
    data = json.loads(project.run("topology", "--json").stdout)
    consumers = {queue["name"]: queue["consumed_by"] for queue in data["queues"]}
    assert consumers["priority_dataset"] == ["fast"] and consumers["retention"] == ["slow"]
    assert data["problems"] == []
