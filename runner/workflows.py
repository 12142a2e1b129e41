"""A small workflow engine: a JSON graph of built-in nodes, run in order from its start node.

Graph: {"nodes": [{"id": "start", "type": "start", "variables": ["name"]},
                  {"id": "greet", "type": "template", "template": "Hello {{ name }}", "output": "greeting"},
                  {"id": "end", "type": "end", "outputs": ["greeting"]}],
        "edges": [{"source": "start", "target": "greet"}, {"source": "greet", "target": "end"}]}

Node types: start (checks `variables` are given), template (renders `template` into `output`),
condition (evaluates the Jinja expression `expression`; its edges carry "branch": "true" or
"false" and only the taken branch runs), http (a request to an allowed host, see
runner.workflow_http; its response into `output`) and end (the run's outputs: `outputs` named, or
every variable). Templates and expressions run in Jinja's sandbox, so a graph cannot reach Python
objects, and each in a child process with limits (runner.limited_process): its CPU time, its
memory, and its output, counted as it is produced. No list of operators could bound what a
template makes (`'a'|center(50000000)`, a string doubled by `~` forty times, nested loops over
`range`), so the limits are the process's. A graph's templates are compiled when it is checked,
in one such child too (Jinja's compiler takes seconds for a large template, and recurses).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import SandboxedEnvironment

from runner import limited_process, workflow_http

NODE_TYPES = ("start", "template", "condition", "http", "end")
BRANCHES = ("true", "false")
MAX_NODES = 200
MAX_VALUE_SIZE = 1_000_000  # items of a string or list, or bits of an integer, one operator may make
MEGABYTE = 1024 * 1024


@dataclass(frozen=True)
class TemplateLimits:
    """What one template or expression may take (the settings DIFY_LOCAL_TEMPLATE_*)."""

    max_output: int = 1_000_000  # characters
    cpu_seconds: float = 5.0
    memory_mb: int = 256

    @classmethod
    def from_settings(cls, settings: Any) -> "TemplateLimits":
        return cls(settings.DIFY_LOCAL_TEMPLATE_MAX_OUTPUT, settings.DIFY_LOCAL_TEMPLATE_TIME_LIMIT,
                   settings.DIFY_LOCAL_TEMPLATE_MEMORY)

    def process(self) -> limited_process.Limits:
        # JSON of the output: at most 6 bytes a character (\u0000), and room for the reply around it
        return limited_process.Limits(self.memory_mb * MEGABYTE, self.cpu_seconds, self.max_output * 6 + 4096,
                                      "DIFY_LOCAL_TEMPLATE_MEMORY", "DIFY_LOCAL_TEMPLATE_TIME_LIMIT")


class _RuntimeOutput(CodeGenerator):
    """Jinja's code generator, without working out constant output while compiling: Jinja calls
    the filters of `{{ 'a'|center(50000000) }}` then, so its output would be made by the compiler,
    outside the count of what a template renders."""

    def _output_child_to_const(self, node, frame, finalize):
        raise nodes.Impossible()


class _BoundedSandbox(SandboxedEnvironment):
    """Jinja's sandbox, with `*` and `**` refused early when their result would be huge (a clearer
    error than the memory limit's for "{{ 'a' * 10**10 }}"); every value is computed when the
    template runs (optimized=False and _RuntimeOutput), in its limited process."""

    intercepted_binops = frozenset({"*", "**"})
    code_generator_class = _RuntimeOutput

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for sized, count in ((left, right), (right, left)):
                if isinstance(sized, (str, list, tuple)) and isinstance(count, int) \
                        and len(sized) * count > MAX_VALUE_SIZE:
                    raise WorkflowError(f"'*' would make a value of more than {MAX_VALUE_SIZE} items")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) \
                and max(left.bit_length(), 1) * right > MAX_VALUE_SIZE:
            raise WorkflowError(f"'**' would make a number of more than {MAX_VALUE_SIZE} bits")
        return super().call_binop(context, operator, left, right)


_jinja = _BoundedSandbox(undefined=StrictUndefined, autoescape=False, optimized=False)


class WorkflowError(ValueError):
    """The graph is not runnable, or its inputs do not fit it."""


class TemplateFailed(WorkflowError):
    """A template or expression failed in its child process: `kind` is the error's class name
    (UndefinedError, SecurityError …), or the limit it reached."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _limited(function, args: tuple, limits: TemplateLimits, what: str) -> Any:
    try:
        return limited_process.run(function, args, limits.process(), what)
    except limited_process.LimitReached as error:
        raise TemplateFailed("LimitReached", str(error)) from None
    except limited_process.ChildError as error:
        raise TemplateFailed(error.kind, str(error)) from None


def _render_in_child(source: str, variables: dict[str, Any], max_output: int) -> str:
    """In the child: the template's output, counted chunk by chunk as it is produced."""
    parts: list[str] = []
    size = 0
    for chunk in _jinja.from_string(source).generate(**variables):
        size += len(chunk)
        if size > max_output:
            raise WorkflowError(f"the template's output is over {max_output} characters "
                                "(DIFY_LOCAL_TEMPLATE_MAX_OUTPUT)")
        parts.append(chunk)
    return "".join(parts)


def _evaluate_in_child(expression: str, variables: dict[str, Any]) -> bool:
    return bool(_jinja.compile_expression(expression, undefined_to_none=False)(**variables))


def _compile_in_child(sources: list[tuple[str, str, str]]) -> None:
    """In the child: compile every template and expression; the first that does not parse fails."""
    for where, kind, text in sources:
        try:
            if kind == "expression":
                _jinja.compile_expression(text)
            else:
                _jinja.from_string(text)
        except TemplateError as error:
            shown = text if len(text) <= 80 else text[:80] + "…"
            what = "expression" if kind == "expression" else "template"
            raise WorkflowError(f"{where}: {what} {shown!r} does not parse: {error}") from None
        except RecursionError:
            raise WorkflowError(f"{where}: its {kind} nests too deeply to compile") from None


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


def _order(graph: Any) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """The nodes reachable from the start node, in an order that respects every edge, and the
    edges into each node."""
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise WorkflowError("a workflow graph is an object with a list of nodes and a list of edges")
    if len(graph["nodes"]) > MAX_NODES:
        raise WorkflowError(f"a workflow has at most {MAX_NODES} nodes, this one has {len(graph['nodes'])}")
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
    incoming: dict[str, list[dict[str, Any]]] = {node_id: [] for node_id in nodes}
    for edge in edges:
        if not isinstance(edge, dict) or not isinstance(edge.get("source"), str) \
                or not isinstance(edge.get("target"), str) or edge["source"] not in nodes \
                or edge["target"] not in nodes:
            raise WorkflowError(f"edge {edge!r} must join two existing nodes")
        branch = edge.get("branch")
        if nodes[edge["source"]]["type"] == "condition":
            if branch not in BRANCHES:
                raise WorkflowError(f"edge {edge!r} leaves condition {edge['source']!r}: its 'branch' must be "
                                    "\"true\" or \"false\"")
        elif branch is not None:
            raise WorkflowError(f"edge {edge!r}: only an edge leaving a condition node has a 'branch'")
        following[edge["source"]].append(edge["target"])
        incoming[edge["target"]].append(edge)
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
    return [nodes[node_id] for node_id in reversed(order)], incoming


def _check_node(node: dict[str, Any], sources: list[tuple[str, str, str]]) -> None:
    """The fields each node type needs, checked before anything runs; its templates and
    expression are added to `sources`, compiled afterwards."""
    where = f"node {node['id']!r}"
    kind = node["type"]
    if kind == "start":
        variables = node.get("variables", [])
        if not isinstance(variables, list) or not all(isinstance(name, str) for name in variables):
            raise WorkflowError(f"{where}: 'variables' must be a list of names")
    elif kind == "template":
        if not isinstance(node.get("template"), str):
            raise WorkflowError(f"{where}: a template node needs a 'template' string")
        sources.append((where, "template", node["template"]))
    elif kind == "condition":
        if not isinstance(node.get("expression"), str) or not node["expression"].strip():
            raise WorkflowError(f"{where}: a condition node needs an 'expression' string, e.g. \"count > 3\"")
        sources.append((where, "expression", node["expression"]))
    elif kind == "http":
        if not isinstance(node.get("url"), str):
            raise WorkflowError(f"{where}: an http node needs a 'url' string")
        method = node.get("method", "GET")
        if method not in workflow_http.METHODS:
            raise WorkflowError(f"{where}: 'method' must be one of {', '.join(workflow_http.METHODS)}")
        headers = node.get("headers", {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise WorkflowError(f"{where}: 'headers' must be an object of strings")
        if "body" in node and not isinstance(node["body"], str):
            raise WorkflowError(f"{where}: 'body' must be a template string")
        timeout = node.get("timeout", 10)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not 0 < timeout <= workflow_http.MAX_TIMEOUT:
            raise WorkflowError(f"{where}: 'timeout' must be a number of seconds above 0, at most "
                                f"{workflow_http.MAX_TIMEOUT:g}")
        for text in (node["url"], node.get("body", "")):
            sources.append((where, "template", text))
    elif kind == "end":
        outputs = node.get("outputs")
        if outputs is not None and (not isinstance(outputs, list) or not all(isinstance(n, str) for n in outputs)):
            raise WorkflowError(f"{where}: 'outputs' must be a list of variable names")
    output = node.get("output")
    if output is not None and (not isinstance(output, str) or not output):
        raise WorkflowError(f"{where}: 'output' must be a non-empty variable name")


def validate(graph: Any, limits: TemplateLimits = TemplateLimits()) -> None:
    """Raise WorkflowError naming what is wrong with the graph."""
    _order(graph)
    sources: list[tuple[str, str, str]] = []
    for node in graph["nodes"]:  # unreachable ones too: a mistake there is still a mistake
        _check_node(node, sources)
    if sources:
        try:
            _limited(_compile_in_child, (sources,), limits, "compiling the graph's templates")
        except TemplateFailed as error:
            raise WorkflowError(str(error)) from None


def _run_node(node: dict[str, Any], variables: dict[str, Any], execution: NodeExecution,
              http_allowed: frozenset[str], limits: TemplateLimits) -> Any:
    """Run one node: its outputs recorded on `execution`; returns the branch a condition took."""
    kind = node["type"]
    name = node.get("output") or node["id"]
    if kind == "start":
        missing = [name for name in node.get("variables", []) if name not in variables]
        if missing:
            raise WorkflowError(f"missing input(s): {', '.join(missing)}")
        execution.inputs = dict(variables)
    elif kind == "template":
        execution.inputs = {"template": node["template"]}
        variables[name] = _render(node["template"], variables, limits, "the template")
        execution.outputs = {name: variables[name]}
    elif kind == "condition":
        execution.inputs = {"expression": node["expression"]}
        taken = _limited(_evaluate_in_child, (node["expression"], variables), limits, "the expression")
        variables[name] = taken
        execution.outputs = {"result": taken, "branch": "true" if taken else "false"}
        return "true" if taken else "false"
    elif kind == "http":
        method = node.get("method", "GET")
        url = _render(node["url"], variables, limits, "the url template")
        body = _render(node["body"], variables, limits, "the body template") if "body" in node else None
        execution.inputs = {"method": method, "url": url, "body": body}
        try:
            response = workflow_http.send(method, url, node.get("headers", {}), body, node.get("timeout", 10),
                                          http_allowed)
        except workflow_http.HttpNodeError as error:
            raise WorkflowError(str(error)) from None
        variables[name] = response
        execution.outputs = {name: response}
    else:  # end
        wanted = node.get("outputs")
        execution.outputs = {key: variables.get(key) for key in wanted} if wanted else dict(variables)
    return None


def _render(source: str, variables: dict[str, Any], limits: TemplateLimits, what: str) -> str:
    return _limited(_render_in_child, (source, variables, limits.max_output), limits, what)


def run(graph: Any, inputs: dict[str, Any], http_allowed: frozenset[str] = frozenset(),
        limits: TemplateLimits = TemplateLimits()) -> WorkflowResult:
    """Run the nodes reachable from start; a node runs when an edge into it is taken, a failing
    node stops the run. Nodes on a branch not taken are not run (and not recorded)."""
    validate(graph, limits)
    nodes, incoming = _order(graph)
    variables: dict[str, Any] = dict(inputs)
    outputs: dict[str, Any] = {}
    executions: list[NodeExecution] = []
    branches: dict[str, Any] = {}  # node id -> the branch it took (None: every outgoing edge)
    for node in nodes:
        if node["type"] != "start" and not any(
                edge["source"] in branches and edge.get("branch") in (None, branches[edge["source"]])
                for edge in incoming[node["id"]]):
            continue
        execution = NodeExecution(node["id"], node["type"], "running", {}, started_at=time.time())
        executions.append(execution)
        try:
            branches[node["id"]] = _run_node(node, variables, execution, http_allowed, limits)
        except (WorkflowError, TemplateError, TypeError, ValueError, ArithmeticError) as error:
            kind = error.kind if isinstance(error, TemplateFailed) else type(error).__name__
            execution.status, execution.error = "failed", f"{kind}: {error}"
            execution.finished_at = time.time()
            return WorkflowResult("failed", {}, executions, f"node {node['id']!r}: {error}")
        if node["type"] == "end":
            outputs = execution.outputs
        execution.status = "succeeded"
        execution.finished_at = time.time()
    return WorkflowResult("succeeded", outputs, executions)
