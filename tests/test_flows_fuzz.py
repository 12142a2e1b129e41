"""Random requests to the workflow, app and plugin endpoints: none may answer 5xx.

A seeded generator (so a failure replays) builds bodies from the fields each endpoint knows,
filled with values of every JSON type, odd strings and extreme numbers, plus random bodies that
are not JSON at all.
"""

from __future__ import annotations

import io
import json
import random
import zipfile

from tests.flows_support import GREETING

ENDPOINTS = [
    ("POST", "/v1/workflows/run", ("graph", "inputs", "app_id")),
    ("POST", "/v1/schedules", ("graph", "cron", "inputs", "app_id", "enabled")),
    ("POST", "/v1/triggers", ("graph", "app_id")),
    ("POST", "/v1/trigger-subscriptions", ("provider", "ttl_seconds")),
    ("POST", "/v1/apps", ("id", "name")),
    ("POST", "/v1/apps/{id}/messages", ("conversation_id", "role", "content")),
    ("POST", "/v1/webhooks/{id}", ("name", "x")),
    ("PUT", "/v1/plugin-index/{id}", ("version",)),
    ("POST", "/v1/plugins/check-upgrades", ("x",)),
    ("GET", "/v1/workflow-runs/{id}", ()),
    ("GET", "/v1/schedules/{id}", ()),
    ("DELETE", "/v1/schedules/{id}", ()),
    ("GET", "/v1/triggers/{id}", ()),
    ("DELETE", "/v1/apps/{id}", ()),
    ("GET", "/v1/apps/{id}", ()),
    ("DELETE", "/v1/plugins/{id}", ()),
    ("POST", "/v1/plugins", ("package",)),  # JSON, not a zip: refused by type
    ("ZIP", "/v1/plugins", ()),  # random bytes and truncated zips as application/zip
]
def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("manifest.yaml", "name: fuzz\nversion: 1.0.0\nauthor: me\n")
        archive.writestr("a.py", "x = 1\n")
    return buffer.getvalue()


ZIP = _zip()
STRINGS = ["", " ", "a", "x" * 300, "../../etc/passwd", "a b", "é", "\u0000", "{{ 7*7 }}", "{% for %}",
           "* * * * *", "0 0 1 1 *", "1,,2 * * * *", "*/0 * * * *", "1.0.0", "user", "start", "%2e%2e", "null"]


def value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 59, 60, 3600, 10 ** 20, -10 ** 20])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, float("inf"), float("nan")])
    if kind in (4, 5):
        return rng.choice(STRINGS)
    if kind == 6:
        return [value(rng, depth + 1) for _ in range(rng.randrange(3))]
    if kind == 7:
        return {rng.choice(["id", "type", "nodes", "edges", "source", "target"]): value(rng, depth + 1)
                for _ in range(rng.randrange(3))}
    return json.loads(json.dumps(GREETING))  # a valid graph, sometimes mangled below


def mangle_graph(rng: random.Random, graph):
    if isinstance(graph, dict) and isinstance(graph.get("nodes"), list) and graph["nodes"] and rng.random() < 0.7:
        node = rng.choice(graph["nodes"])
        if isinstance(node, dict):
            node[rng.choice(["id", "type", "template", "variables", "outputs", "output", "expression", "url"])] = \
                value(rng, 2)
    return graph


def body(rng: random.Random, fields: tuple[str, ...]) -> bytes:
    roll = rng.random()
    if roll < 0.08:
        return rng.choice([b"{", b"[]", b"1", b"\xff\xfe", b"null", b'"x"', b"{\"a\": NaN}"])
    chosen = {field: value(rng) for field in fields if rng.random() < 0.7}
    if "graph" in chosen or ("graph" in fields and rng.random() < 0.5):
        chosen["graph"] = mangle_graph(rng, chosen.get("graph", json.loads(json.dumps(GREETING))))
    if rng.random() < 0.1:
        chosen["unexpected"] = 1
    return json.dumps(chosen, allow_nan=True).encode()


def test_no_request_to_the_flow_endpoints_is_a_5xx(project):
    project.up()
    rng = random.Random(6)
    failures = []
    for n in range(400):
        method, path, fields = rng.choice(ENDPOINTS)
        path = path.replace("{id}", rng.choice(["a", "no-such", "x" * 129, "a.b", "%20", "..", "a%2Fb"]))
        raw = body(rng, fields) if method in ("POST", "PUT") else None
        headers = None
        if method == "ZIP":
            method, headers = "POST", {"Content-Type": "application/zip"}
            whole = b"PK\x03\x04" + rng.randbytes(rng.randrange(200)) if rng.random() < 0.5 else ZIP
            raw = whole[:rng.randrange(1, len(whole) + 1)]
        status, answer = project.api.request(method, path, raw=raw, headers=headers)
        if status >= 500 or not isinstance(answer, dict):
            failures.append((n, method, path, raw, status, answer))
    assert failures == []
