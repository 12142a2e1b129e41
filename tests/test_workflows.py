"""Workflows through the running stack: a webhook run with its node executions and run log, cron
schedules firing once per due time with several pollers at once, and every bad request a 4xx."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest

from runner import workflows
from tests.flows_support import GREETING, accepted, rows, run_with_log, task_result
from tests.helpers import wait_until

YEARLY = "0 0 1 1 *"  # the next due time after the first is months away: any second dispatch is a double


def branching_graph(api_port: int) -> dict:
    """start → http GET the API's /health → condition on its status → one of two templates → end."""
    return {
        "nodes": [
            {"id": "start", "type": "start", "variables": ["name"]},
            {"id": "health", "type": "http", "method": "GET", "url": f"http://127.0.0.1:{api_port}/health"},
            {"id": "check", "type": "condition", "expression": "health.status_code == 200"},
            {"id": "up", "type": "template", "template": "Hello {{ name }}, the API is {{ health.json.status }}",
             "output": "message"},
            {"id": "down", "type": "template", "template": "Sorry {{ name }}", "output": "message"},
            {"id": "end", "type": "end", "outputs": ["message"]},
        ],
        "edges": [
            {"source": "start", "target": "health"}, {"source": "health", "target": "check"},
            {"source": "check", "target": "up", "branch": "true"},
            {"source": "check", "target": "down", "branch": "false"},
            {"source": "up", "target": "end"}, {"source": "down", "target": "end"},
        ],
    }


def test_engine_runs_only_the_branch_taken_and_refuses_hosts_not_allowed():
    graph = {
        "nodes": [{"id": "start", "type": "start", "variables": ["n"]},
                  {"id": "c", "type": "condition", "expression": "n > 3"},
                  {"id": "big", "type": "template", "template": "big {{ n }}", "output": "say"},
                  {"id": "small", "type": "template", "template": "small {{ n }}", "output": "say"},
                  {"id": "end", "type": "end", "outputs": ["say"]}],
        "edges": [{"source": "start", "target": "c"}, {"source": "c", "target": "big", "branch": "true"},
                  {"source": "c", "target": "small", "branch": "false"},
                  {"source": "big", "target": "end"}, {"source": "small", "target": "end"}],
    }
    result = workflows.run(graph, {"n": 5})
    assert result.outputs == {"say": "big 5"} and [e.node_id for e in result.executions] == ["start", "c", "big", "end"]
    assert workflows.run(graph, {"n": 1}).outputs == {"say": "small 1"}
    http = {"nodes": [{"id": "start", "type": "start"}, {"id": "get", "type": "http", "url": "http://example.com/"}],
            "edges": [{"source": "start", "target": "get"}]}
    refused = workflows.run(http, {}, frozenset({"127.0.0.1"}))
    assert refused.status == "failed" and "host 'example.com'" in refused.error and "127.0.0.1" in refused.error
    huge = {"nodes": [{"id": "start", "type": "start"},
                      {"id": "t", "type": "template", "template": "{{ 'a' * 10 ** 10 }}"}],
            "edges": [{"source": "start", "target": "t"}]}
    refused = workflows.run(huge, {})
    assert refused.status == "failed" and "more than 1000000 items" in refused.error
    with pytest.raises(workflows.WorkflowError, match="'branch' must be"):
        workflows.validate({**graph, "edges": [{"source": "start", "target": "c"}, {"source": "c", "target": "big"}]})
    with pytest.raises(workflows.WorkflowError, match="does not parse"):
        workflows.validate({"nodes": [{"id": "s", "type": "start"}, {"id": "c", "type": "condition",
                                                                      "expression": "1 +"}]})


def test_webhook_run_is_recorded_with_its_node_executions_and_run_log(project):
    project.up(env={"DIFY_LOCAL_WORKFLOW_HTTP_ALLOWED_HOSTS": f"127.0.0.1:{project.api_port}"})
    status, trigger = project.api.post("/v1/triggers", {"graph": branching_graph(project.api_port),
                                                        "app_id": "hook-app"})
    assert status == 201, trigger
    sent = accepted(project.api.post(trigger["webhook"], {"name": "Ann"}))
    assert sent["task"] == "dispatch_triggered_workflow_task"
    dispatched = task_result(project, sent["poll"])
    ran = task_result(project, f"/v1/tasks/{dispatched['run_task_id']}")
    assert ran["status"] == "succeeded", ran
    assert ran["outputs"] == {"message": "Hello Ann, the API is ok"}

    run = run_with_log(project, ran["run_id"])
    assert run["triggered_by"] == "webhook" and run["source_id"] == dispatched["event_id"]
    assert run["app_id"] == "hook-app" and run["inputs"] == {"name": "Ann"}
    nodes = run["node_executions"]
    assert [node["node_id"] for node in nodes] == ["start", "health", "check", "up", "end"]  # "down" not taken
    assert all(node["status"] == "succeeded" for node in nodes)
    assert nodes[1]["outputs"]["health"]["status_code"] == 200
    assert nodes[2]["outputs"] == {"result": True, "branch": "true"}
    log = json.loads((project.state / "files" / run["log_path"]).read_text())
    assert log["id"] == ran["run_id"] and [n["node_id"] for n in log["node_executions"]] == [
        "start", "health", "check", "up", "end"]

    status, detail = project.api.get(f"/v1/triggers/{trigger['id']}")
    assert status == 200 and detail["events"][0]["payload"] == {"name": "Ann"}
    assert detail["events"][0]["run_id"] == ran["run_id"] and detail["events"][0]["run_status"] == "succeeded"

    # an http node to a host not allowed fails its run, naming the host; the run is still recorded
    graph = {"nodes": [{"id": "start", "type": "start"}, {"id": "get", "type": "http", "url": "http://example.com/"}],
             "edges": [{"source": "start", "target": "get"}]}
    sent = accepted(project.api.post("/v1/workflows/run", {"graph": graph}))
    failed = task_result(project, sent["poll"])
    assert failed["status"] == "failed" and "host 'example.com'" in failed["error"]
    assert run_with_log(project, failed["run_id"])["node_executions"][-1]["status"] == "failed"
    assert project.api.post("/v1/webhooks/no-such-trigger", {})[0] == 404


def test_schedules_fire_once_per_due_time_with_pollers_running_at_once(project):
    """Five due schedules, six pollers sent at once to two workers: each due time runs once."""
    # Beat's own poller is off so the test knows every poll; batches of 2, at most 3 per poll.
    env = {"ENABLE_WORKFLOW_SCHEDULE_POLLER_TASK": "false", "WORKFLOW_SCHEDULE_POLLER_BATCH_SIZE": "2",
           "WORKFLOW_SCHEDULE_MAX_DISPATCH_PER_TICK": "3", "CELERY_WORKER_AMOUNT": "6"}
    project.up(env=env)
    # A second worker process consuming schedule_poller: pollers run in two processes as well as
    # in two threads of one.
    second = project.start("serve", "worker", "-Q", "schedule_poller", "-c", "2", "-n", "poller2@%h", env=env)
    second.wait_for_line(r"ready\.", timeout=60)
    ids = []
    for n in range(5):
        status, body = project.api.post("/v1/schedules", {"graph": GREETING, "cron": YEARLY,
                                                          "inputs": {"name": f"S{n}"}, "app_id": "cron-app"})
        assert status == 201, body
        assert body["next_run_at"] > time.time()
        ids.append(body["id"])
    due = time.time() - 30
    with sqlite3.connect(project.database) as db:  # make all five due now
        db.execute("UPDATE workflow_schedules SET next_run_at = ?", [due])

    answers: list[dict] = []

    def poll():
        answers.append(accepted(project.api.post("/v1/tasks/workflow_schedule_poller_task", {})))

    pollers = [threading.Thread(target=poll) for _ in range(6)]
    for thread in pollers:
        thread.start()
    for thread in pollers:
        thread.join(30)
    results = [task_result(project, answer["poll"]) for answer in answers]
    assert len(results) == 6
    assert all(result["dispatched"] <= 3 for result in results), results
    assert sorted(s for result in results for s in result["schedules"]) == sorted(ids), results

    def all_ran():
        return rows(project, "SELECT COUNT(*) FROM schedule_dispatches WHERE run_id IS NOT NULL")[0][0] == 5
    wait_until(all_ran, 60, "the five scheduled runs")
    assert rows(project, "SELECT schedule_id, due_at FROM schedule_dispatches ORDER BY schedule_id") == [
        (schedule_id, due) for schedule_id in sorted(ids)]
    runs = rows(project, "SELECT source_id, COUNT(*) FROM workflow_runs WHERE triggered_by = 'schedule' "
                         "GROUP BY source_id ORDER BY source_id")
    assert runs == [(schedule_id, 1) for schedule_id in sorted(ids)]

    # Polling again (twice, at once) finds nothing due: the next due time is next 1 January.
    again = [accepted(project.api.post("/v1/tasks/workflow_schedule_poller_task", {})) for _ in range(2)]
    assert [task_result(project, answer["poll"])["dispatched"] for answer in again] == [0, 0]
    status, schedule = project.api.get(f"/v1/schedules/{ids[0]}")
    assert status == 200 and len(schedule["dispatches"]) == 1 and schedule["dispatches"][0]["run_id"]
    assert schedule["next_run_at"] > time.time() + 3600
    run = run_with_log(project, schedule["dispatches"][0]["run_id"])
    assert run["outputs"] == {"greeting": "Hello S0"} and len(run["node_executions"]) == 3


def test_expiring_trigger_subscriptions_are_refreshed_by_the_poller(project):
    project.up(env={"ENABLE_WORKFLOW_SCHEDULE_POLLER_TASK": "false"})
    status, soon = project.api.post("/v1/trigger-subscriptions", {"provider": "github", "ttl_seconds": 300})
    assert status == 201, soon
    status, later = project.api.post("/v1/trigger-subscriptions", {"provider": "slack", "ttl_seconds": 86400})
    assert status == 201, later
    sent = accepted(project.api.post("/v1/tasks/workflow_schedule_poller_task", {}))
    assert task_result(project, sent["poll"])["refreshes"] == [soon["id"]]

    def refreshed():
        listed = {s["id"]: s for s in project.api.get("/v1/trigger-subscriptions")[1]["subscriptions"]}
        return listed if listed[soon["id"]]["refresh_count"] == 1 else None
    listed = wait_until(refreshed, 30, "the refresh of the expiring subscription")
    assert listed[soon["id"]]["expires_at"] > soon["expires_at"]
    assert listed[later["id"]]["refresh_count"] == 0


BAD_REQUESTS = [
    ("POST", "/v1/workflows/run", b"{", 400, "not valid JSON"),
    ("POST", "/v1/workflows/run", b"[]", 400, "must be a JSON object"),
    ("POST", "/v1/workflows/run", b"{}", 400, "'graph' is required"),
    ("POST", "/v1/workflows/run", json.dumps({"graph": GREETING, "extra": 1}).encode(), 400, "unknown field 'extra'"),
    ("POST", "/v1/workflows/run", json.dumps({"graph": {"nodes": [{"id": "a", "type": "python"}]}}).encode(), 400,
     "type must be one of start, template, condition, http, end"),
    ("POST", "/v1/workflows/run", json.dumps({"graph": GREETING, "inputs": [1]}).encode(), 400,
     "'inputs' must be a JSON object"),
    ("POST", "/v1/workflows/run", json.dumps({"graph": GREETING, "app_id": "a b"}).encode(), 400, "'app_id' must be"),
    ("POST", "/v1/schedules", json.dumps({"graph": GREETING}).encode(), 400, "'cron' is required"),
    ("POST", "/v1/schedules", json.dumps({"graph": GREETING, "cron": "every minute"}).encode(), 400, "five fields"),
    ("POST", "/v1/schedules", json.dumps({"graph": GREETING, "cron": "61 * * * *"}).encode(), 400, "'cron'"),
    ("POST", "/v1/schedules", json.dumps({"graph": GREETING, "cron": "1,,2 * * * *"}).encode(), 400, "'cron'"),
    ("POST", "/v1/workflows/run", json.dumps({"graph": {**GREETING, "edges": [{"source": ["start"],
                                                                               "target": "end"}]}}).encode(),
     400, "must join two existing nodes"),
    ("POST", "/v1/schedules", json.dumps({"graph": GREETING, "cron": "* * * * *", "enabled": "yes"}).encode(), 400,
     "'enabled' must be true or false"),
    ("GET", "/v1/schedules/nope", None, 404, "no schedule 'nope'"),
    ("DELETE", "/v1/schedules/nope", None, 404, "no schedule 'nope'"),
    ("GET", "/v1/workflow-runs/nope", None, 404, "no workflow run"),
    ("GET", "/v1/workflow-runs?limit=0", None, 400, "'limit' must be an integer from 1 to 500"),
    ("GET", "/v1/workflow-runs?limit=x", None, 400, "'limit'"),
    ("POST", "/v1/triggers", json.dumps({"graph": {"nodes": []}}).encode(), 400, "exactly one start node"),
    ("POST", "/v1/webhooks/nope", b"{}", 404, "no trigger 'nope'"),
    ("POST", "/v1/webhooks/nope", b"[1]", 400, "must be a JSON object"),
    ("POST", "/v1/trigger-subscriptions", b"{}", 400, "'provider' is required"),
    ("POST", "/v1/trigger-subscriptions", json.dumps({"provider": "x", "ttl_seconds": 1}).encode(), 400,
     "'ttl_seconds' must be an integer from 60"),
    ("POST", "/v1/trigger-subscriptions", json.dumps({"provider": "x", "ttl_seconds": 1e400}).encode(), 400,
     "'ttl_seconds'"),
]


def test_bad_workflow_requests_are_4xx_naming_the_field(project):
    project.up()
    for method, path, raw, expected, words in BAD_REQUESTS:
        status, body = project.api.request(method, path, raw=raw)
        assert status == expected and words in body["error"], (method, path, raw, status, body)


def test_claims_from_many_threads_never_overlap(tmp_path):
    """Eight pollers over one SQLite file, each with its own connection: 60 due schedules, each
    claimed exactly once, in batches of 3, at most 10 per poll."""
    from runner.schedules import claim_due_schedules
    from runner.store.database import Database
    from runner.store.migrations import apply_migrations

    database = Database(tmp_path / "metadata.db")
    apply_migrations(database)
    with database.transaction() as db:
        db["workflow_schedules"].insert_all({"id": f"s{n:02d}", "graph": "{}", "cron": YEARLY,
                                             "next_run_at": time.time() - 60} for n in range(60))
    counter = iter(range(10 ** 6))
    claims: list[list] = []
    lock = threading.Lock()

    def poll():
        sent = claim_due_schedules(database, 3, 10, lambda: f"t{next(counter)}", lambda claim: None)
        with lock:
            claims.append(sent)

    threads = [threading.Thread(target=poll) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(len(sent) <= 10 for sent in claims)
    claimed = sorted(claim.schedule_id for sent in claims for claim in sent)
    assert claimed == [f"s{n:02d}" for n in range(60)]  # all of them, none twice
    with database.connect() as db:
        assert db.execute("SELECT COUNT(*) FROM schedule_dispatches").fetchone()[0] == 60
    assert claim_due_schedules(database, 3, 0, lambda: "x", lambda claim: None) == []
    database.close()


SMALL = workflows.TemplateLimits(max_output=100_000, cpu_seconds=2, memory_mb=128)
TEMPLATE_BOMBS = [  # (template, words of the node's error): each bounded by its process, not by a list of operators
    ("{{ 'a'|center(50000000) }}", "output is over 100000 characters"),
    ("{{ 'a'|center(2000000000) }}", "more than 128 MB of memory"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s[:3] }}",
     "more than 128 MB of memory"),
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "more than 2 s of CPU"),
    ("{% for a in range(100000) %}{{ 'abcdefghij' }}{% endfor %}", "output is over 100000 characters"),
    ("{{ lipsum(3000, min=50, max=100) }}", "output is over 100000 characters"),
    ("{{ '%s'|format('x') * 100 ~ 'y'.ljust(1000000000) }}", "more than 128 MB of memory"),
]


@pytest.mark.parametrize("template, words", TEMPLATE_BOMBS, ids=[words for _, words in TEMPLATE_BOMBS])
def test_a_template_is_bounded_in_output_memory_and_cpu(template, words):
    graph = {"nodes": [{"id": "start", "type": "start"}, {"id": "t", "type": "template", "template": template},
                       {"id": "end", "type": "end"}],
             "edges": [{"source": "start", "target": "t"}, {"source": "t", "target": "end"}]}
    result = workflows.run(graph, {}, limits=SMALL)
    assert result.status == "failed" and words in result.error, result.error
    failed = result.executions[-1]
    assert failed.node_id == "t" and failed.error.startswith(("LimitReached: ", "WorkflowError: ")), failed.error


def test_conditions_and_http_templates_are_bounded_too_and_limits_leave_normal_templates_alone():
    spin = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    condition = {"nodes": [{"id": "start", "type": "start"},
                           {"id": "c", "type": "condition", "expression": "('a'|center(2000000000))|length > 1"}],
                 "edges": [{"source": "start", "target": "c"}]}
    result = workflows.run(condition, {}, limits=SMALL)
    assert result.status == "failed" and "more than 128 MB of memory" in result.error, result.error
    http = {"nodes": [{"id": "start", "type": "start"}, {"id": "h", "type": "http", "url": spin}],
            "edges": [{"source": "start", "target": "h"}]}
    result = workflows.run(http, {}, frozenset({"127.0.0.1"}), limits=SMALL)
    assert result.status == "failed" and "more than 2 s of CPU" in result.error, result.error
    fine = {"nodes": [{"id": "start", "type": "start", "variables": ["who"]},
                      {"id": "t", "type": "template", "template": "{{ ('Hello ' ~ who)|center(30) }}", "output": "o"},
                      {"id": "end", "type": "end", "outputs": ["o"]}],
            "edges": [{"source": "start", "target": "t"}, {"source": "t", "target": "end"}]}
    outputs = workflows.run(fine, {"who": "\u05d0 e\u0301"}, limits=SMALL).outputs
    assert outputs == {"o": "Hello \u05d0 e\u0301".center(30)}


def test_a_graph_whose_templates_do_not_compile_is_refused_naming_the_node():
    deep = "{{ " + "(" * 2000 + "1" + ")" * 2000 + " }}"
    with pytest.raises(workflows.WorkflowError, match="node 't': its template nests too deeply"):
        workflows.validate({"nodes": [{"id": "s", "type": "start"}, {"id": "t", "type": "template", "template": deep}]})
    slow = "{% if a %}b{% endif %}" * 40000  # Jinja's compiler takes seconds for this
    # refused by its CPU limit, or on a loaded machine (tests in parallel) by the wall time that limit allows
    with pytest.raises(workflows.WorkflowError, match=r"more than 0.5 s of CPU|took longer than \d"):
        workflows.validate({"nodes": [{"id": "s", "type": "start"}, {"id": "t", "type": "template", "template": slow}]},
                           workflows.TemplateLimits(cpu_seconds=0.5))


class HostileServer(threading.Thread):
    """An HTTP server on loopback answering every request with the raw bytes given."""

    def __init__(self, answer: bytes):
        import socket

        super().__init__(daemon=True)
        self.answer = answer
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]

    def run(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)
                connection.sendall(self.answer)


@pytest.mark.parametrize("answer, words", [
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + b"[" * 10_000 + b"]" * 10_000,
     None),
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + b"[" * 900 + b"]" * 900,
     None),
    (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"Connection: close\r\n\r\nok",
     "got more than 100 headers"),
    (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\nok", "LineTooLong"),
], ids=["JSON 10,000 deep", "JSON 900 deep", "200 headers", "a 70 KB header line"])
def test_an_http_node_reads_a_hostile_response_without_crashing_the_run(answer, words):
    server = HostileServer(answer)
    server.start()
    try:
        graph = {"nodes": [{"id": "s", "type": "start"},
                           {"id": "h", "type": "http", "url": f"http://127.0.0.1:{server.port}/", "output": "r"},
                           {"id": "end", "type": "end", "outputs": ["r"]}],
                 "edges": [{"source": "s", "target": "h"}, {"source": "h", "target": "end"}]}
        result = workflows.run(graph, {}, frozenset({f"127.0.0.1:{server.port}"}))
    finally:
        server.server.close()
    if words is None:  # (900 deep parses, and json.dumps of it recursed when the run was recorded)
        assert result.status == "succeeded" and result.outputs["r"]["json"] is None, result.error
        json.dumps(result.outputs)
    else:
        assert result.status == "failed" and words in result.error, result.error
