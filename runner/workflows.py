"""A small workflow engine: a JSON graph of built-in nodes, run in order from its start node.

Graph: {"nodes": [{"id": "start", "type": "start", "variables": ["name"]},
                  {"id": "greet", "type": "template", "template": "Hello {{ name }}", "output": "greeting"},
                  {"id": "end", "type": "end", "outputs": ["greeting"]}],
        "edges": [{"source": "start", "target": "greet"}, {"source": "greet", "target": "end"}]}

Templates render in Jinja's sandbox, so a graph cannot reach Python objects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

NODE_TYPES = ("start", "template", "end")
_jinja = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


class WorkflowError(ValueError):
    """The graph is not runnable, or its inputs do not fit it."""


@dataclass
class NodeExecution:
    node_id: str
    node_type: str
    status: str
    inputs: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    started_at: float = 0.0
    finished_at: float = 0.0


@dataclass
class WorkflowResult:
    status: str  # succeeded | failed
    outputs: dict[str, Any]
    executions: list[NodeExecution]
    error: str | None = None


def _order(graph: Any) -> list[dict[str, Any]]:
    """The nodes reachable from the start node, in an order that respects every edge."""
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise WorkflowError("a workflow graph is an object with a list of nodes and a list of edges")
    nodes: dict[str, dict[str, Any]] = {}
    for node in graph["nodes"]:
        if not isinstance(node, dict) or not isinstance(node.get("id"), str) or not node["id"]:
            raise WorkflowError("every node needs a non-empty string id")
        if node.get("type") not in NODE_TYPES:
            raise WorkflowError(f"node {node['id']!r}: type must be one of {', '.join(NODE_TYPES)}")
        if node["id"] in nodes:
            raise WorkflowError(f"node id {node['id']!r} is used twice")
        nodes[node["id"]] = node
    starts = [node for node in nodes.values() if node["type"] == "start"]
    if len(starts) != 1:
        raise WorkflowError(f"a workflow needs exactly one start node, found {len(starts)}")
    edges = graph.get("edges", [])
    if not isinstance(edges, list):
        raise WorkflowError("edges must be a list of {source, target}")
    following: dict[str, list[str]] = {node_id: [] for node_id in nodes}
    for edge in edges:
        if not isinstance(edge, dict) or edge.get("source") not in nodes or edge.get("target") not in nodes:
            raise WorkflowError(f"edge {edge!r} must join two existing nodes")
        following[edge["source"]].append(edge["target"])
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(node_id: str) -> None:  # depth-first topological sort with cycle detection
        if state.get(node_id) == "done":
            return
        if state.get(node_id) == "visiting":
            raise WorkflowError(f"the graph has a cycle through {node_id!r}")
        state[node_id] = "visiting"
        for target in following[node_id]:
            visit(target)
        state[node_id] = "done"
        order.append(node_id)

    visit(starts[0]["id"])
    return [nodes[node_id] for node_id in reversed(order)]


def validate(graph: Any) -> None:
    _order(graph)


def run(graph: Any, inputs: dict[str, Any]) -> WorkflowResult:
    """Run every node reachable from start; a failing node stops the run."""
    nodes = _order(graph)
    variables: dict[str, Any] = dict(inputs)
    outputs: dict[str, Any] = {}
    executions: list[NodeExecution] = []
    for node in nodes:
        execution = NodeExecution(node["id"], node["type"], "running", {}, started_at=time.time())
        executions.append(execution)
        try:
            if node["type"] == "start":
                missing = [name for name in node.get("variables", []) if name not in variables]
                if missing:
                    raise WorkflowError(f"missing input(s): {', '.join(missing)}")
                execution.inputs = dict(inputs)
            elif node["type"] == "template":
                text = node.get("template")
                if not isinstance(text, str):
                    raise WorkflowError("a template node needs a template string")
                execution.inputs = {"template": text}
                name = node.get("output") or node["id"]
                variables[name] = _jinja.from_string(text).render(**variables)
                execution.outputs = {name: variables[name]}
            else:  # end
                wanted = node.get("outputs")
                outputs = {name: variables.get(name) for name in wanted} if wanted else dict(variables)
                execution.outputs = outputs
            execution.status = "succeeded"
        except (WorkflowError, TemplateError) as error:
            execution.status, execution.error = "failed", f"{type(error).__name__}: {error}"
            execution.finished_at = time.time()
            return WorkflowResult("failed", {}, executions, f"node {node['id']!r}: {error}")
        execution.finished_at = time.time()
    return WorkflowResult("succeeded", outputs, executions)
