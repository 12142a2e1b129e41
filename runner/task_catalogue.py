"""The tasks as their source defines them, read with `ast` and never imported.

The API lists tasks and checks a request's arguments against a task's signature, but it never runs
a task: it sends by name. Importing the task modules only for their signatures would tie the API
(and beat) to every task file, so that editing one would restart them as well as the worker. Read
from the source instead, re-read whenever a file changes, the API follows the current definitions
without a restart: a task that gains a parameter accepts it at once.

A task is a top-level function decorated with `@task("name", ...)` from runner/tasks/base.py (a
bound task: its first parameter, `self`, is dropped). What is read:

- the signature: parameters, kinds and defaults. A default that is not a literal (a constant's
  name, a call) is shown as its source text and never evaluated.
- type hints for the argument check, evaluated in a small namespace (str, int, float, bool, dict,
  list, None, typing's Any, Optional, Union, Dict, List); any other annotation counts as Any,
  so an exotic annotation relaxes the check instead of breaking it.
- the first line of the docstring.

When a task module's source cannot be read (a syntax error while it is being edited, or sources
missing from a packaged binary built without them), the API keeps serving: a routed task not found
in the readable files may be defined in the unreadable one, so it is listed and sent *unchecked*,
with the reason given beside it. That is what the worker will meet too: the message waits in its
queue until the file is fixed and the worker is back. Each unreadable file is logged once per
version of the file, missing sources once per process.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import logging
import os
import threading
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from runner.tasks import TASK_MODULES

log = logging.getLogger("dify_local.tasks")

HINT_NAMES: Mapping[str, Any] = {
    "str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list, "None": type(None),
    "Any": Any, "Optional": typing.Optional, "Union": typing.Union, "Dict": dict, "List": list,
}
TYPING_MODULES = ("typing", "t")  # `typing.Optional[str]`, `t.Any`
MISSING_SOURCES_HINT = "a packaged binary must bundle runner/tasks/*.py as source (see build/README.md)"


class SourceText:
    """A default or annotation shown as written in the source: `name=DEFAULT_TTL`, not a guess."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SourceText) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


@dataclass(frozen=True)
class TaskDefinition:
    name: str
    signature: inspect.Signature | None  # None: unknown, the arguments are not checked
    hints: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    unknown_because: str = ""  # why the signature is unknown


@dataclass(frozen=True)
class Catalogue:
    tasks: Mapping[str, TaskDefinition]
    unreadable: Mapping[str, str]  # module -> why its source could not be read

    def lookup(self, name: str) -> TaskDefinition | None:
        """The task's definition; an unknown-signature one when it may be in an unreadable module."""
        if name in self.tasks:
            return self.tasks[name]
        if self.unreadable:
            by_reason: dict[str, list[str]] = {}
            for module, why in self.unreadable.items():
                by_reason.setdefault(why, []).append(module)
            reasons = "; ".join(f"{', '.join(modules)}: {why}" for why, modules in by_reason.items())
            return TaskDefinition(name, None, unknown_because=f"arguments not checked, task source unreadable "
                                                              f"({reasons})")
        return None


# -- reading one module's source ----------------------------------------------------------------

def _task_name(decorator: ast.expr) -> str | None:
    """'name' for `@task("name", ...)`, `@task(name="name")` or `@base.task("name")`."""
    if not isinstance(decorator, ast.Call):
        return None
    called = decorator.func
    if not ((isinstance(called, ast.Name) and called.id == "task")
            or (isinstance(called, ast.Attribute) and called.attr == "task")):
        return None
    named = [decorator.args[0]] if decorator.args else [k.value for k in decorator.keywords if k.arg == "name"]
    if named and isinstance(named[0], ast.Constant) and isinstance(named[0].value, str):
        return named[0].value
    return None


def _default(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except Exception:  # a name, a call, an expression: shown, never evaluated
        return SourceText(ast.unparse(node))


def _hint(node: ast.expr | None) -> Any:
    """The annotation as a type the argument check understands; Any for whatever it does not."""
    try:
        return _evaluate_hint(node)
    except Exception:  # Optional[] or Union[str] raise TypeError; a deep expression RecursionError
        return Any


def _evaluate_hint(node: ast.expr | None) -> Any:
    if node is None:
        return Any
    if isinstance(node, ast.Constant):
        if node.value is None:
            return type(None)
        if isinstance(node.value, str):  # a quoted annotation: `"str | None"`
            return _evaluate_hint(ast.parse(node.value, mode="eval").body)
        return Any
    if isinstance(node, ast.Name):
        return HINT_NAMES.get(node.id, Any)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in TYPING_MODULES:
        return HINT_NAMES.get(node.attr, Any)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return typing.Union[_evaluate_hint(node.left), _evaluate_hint(node.right)]
    if isinstance(node, ast.Subscript):
        base = _evaluate_hint(node.value)
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if base is typing.Optional or base is typing.Union:
            options = tuple(_evaluate_hint(item) for item in items)
            return base[options[0] if len(options) == 1 else options]  # Optional[int, str] raises: Any
        return base  # list[str], dict[str, Any]: the check looks at the container only
    return Any


def _annotation(node: ast.expr | None) -> Any:
    """Shown as written, a quoted one without its quotes (`text: str`, as Python shows `'str'` evaluated)."""
    if node is None:
        return inspect.Parameter.empty
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return SourceText(node.value)
    return SourceText(ast.unparse(node))


def _signature(function: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[inspect.Signature, dict[str, Any]]:
    spec = function.args
    Parameter = inspect.Parameter
    positional = [(arg, Parameter.POSITIONAL_ONLY) for arg in spec.posonlyargs] + \
                 [(arg, Parameter.POSITIONAL_OR_KEYWORD) for arg in spec.args]
    defaults = [Parameter.empty] * (len(positional) - len(spec.defaults)) + [_default(d) for d in spec.defaults]
    parameters = [(arg, kind, default) for (arg, kind), default in zip(positional, defaults, strict=True)]
    parameters = parameters[1:]  # a bound task: the first parameter is `self`
    if spec.vararg:
        parameters.append((spec.vararg, Parameter.VAR_POSITIONAL, Parameter.empty))
    for arg, default in zip(spec.kwonlyargs, spec.kw_defaults, strict=True):
        parameters.append((arg, Parameter.KEYWORD_ONLY, Parameter.empty if default is None else _default(default)))
    if spec.kwarg:
        parameters.append((spec.kwarg, Parameter.VAR_KEYWORD, Parameter.empty))
    signature = inspect.Signature(
        [Parameter(arg.arg, kind, default=default, annotation=_annotation(arg.annotation))
         for arg, kind, default in parameters],
        return_annotation=_annotation(function.returns) if function.returns else inspect.Signature.empty)
    # *args and **kwargs arrive as a tuple and a dict: their annotations describe the items, unchecked here
    hints = {arg.arg: _hint(arg.annotation) for arg, kind, _ in parameters
             if arg.annotation is not None and kind not in (Parameter.VAR_POSITIONAL, Parameter.VAR_KEYWORD)}
    return signature, hints


def read_task_definitions(source: bytes, filename: str) -> dict[str, TaskDefinition]:
    """The tasks defined in one module's source. Raises SyntaxError (or ValueError) if it does not parse."""
    tree = ast.parse(source, filename=filename)
    found: dict[str, TaskDefinition] = {}
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        name = next(filter(None, map(_task_name, node.decorator_list)), None)
        if name is None:
            continue
        try:
            signature, hints = _signature(node)
        except ValueError as error:  # e.g. a duplicate parameter name, which Python itself refuses
            found[name] = TaskDefinition(name, None, unknown_because=f"{filename}: {error}")
            continue
        description = (ast.get_docstring(node) or "").strip().split("\n")[0]
        found[name] = TaskDefinition(name, signature, hints, description)
    return found


# -- locating module files, and the per-file cache ----------------------------------------------

@dataclass(frozen=True)
class _ModuleRead:
    version: tuple  # (st_mtime_ns, st_size, st_ino)
    tasks: Mapping[str, TaskDefinition]
    problem: str = ""  # why it could not be parsed; logged once per version


_cache: dict[str, _ModuleRead] = {}  # path -> its tasks as last read
_paths: dict[str, str] = {}  # module -> its source file, once found
_lock = threading.Lock()
_missing_logged: set[str] = set()


def source_path(module: str) -> str | None:
    """The module's .py file, found without importing it (only its package, runner.tasks, is)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = spec.origin if spec else None
    if not origin or not isinstance(origin, str):
        return None
    if origin.endswith(".pyc"):  # a frozen (PyInstaller) module names its .pyc; the .py may sit beside it
        origin = origin[:-1]
    return origin if origin.endswith(".py") else None


def _parse_problem(error: Exception, path: str) -> str:
    if isinstance(error, SyntaxError):
        return f"{path} line {error.lineno}: {error.msg}"
    return f"{path}: {type(error).__name__}: {error}"


def _read_module(path: str) -> _ModuleRead | None:
    """The module's tasks, parsed again only when the file changed; None when there is no file."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    version = (status.st_mtime_ns, status.st_size, status.st_ino)
    with _lock:
        cached = _cache.get(path)
        if cached is not None and cached.version == version:
            return cached
        try:
            with open(path, "rb") as file:
                read = _ModuleRead(version, read_task_definitions(file.read(), path))
        except FileNotFoundError:  # replaced between stat and open (an editor saving): next time
            return None
        except Exception as error:  # SyntaxError, ValueError (null bytes), RecursionError, OSError
            read = _ModuleRead(version, {}, _parse_problem(error, path))
            log.warning("cannot read the tasks of %s; their arguments are sent unchecked until it is fixed",
                        read.problem)
        _cache[path] = read
        return read


def _read_module_of(module: str) -> _ModuleRead | None:
    # find_spec costs more than the rest of a request's catalogue read; a module's file stays put,
    # so its path is remembered, and looked up again only when the file is gone.
    path = _paths.get(module)
    read = _read_module(path) if path else None
    if read is None:
        path = source_path(module)
        read = _read_module(path) if path else None
        if read is not None:
            _paths[module] = path
    return read


def read_catalogue(modules: Iterable[str] = TASK_MODULES) -> Catalogue:
    """Every task the modules' source defines, as of now."""
    tasks: dict[str, TaskDefinition] = {}
    unreadable: dict[str, str] = {}
    missing: list[str] = []
    for module in modules:
        read = _read_module_of(module)
        if read is None:
            missing.append(module)
            unreadable[module] = "source file not found"
        elif read.problem:
            unreadable[module] = read.problem
        else:
            tasks.update(read.tasks)
    _log_missing(missing)
    return Catalogue(tasks, unreadable)


def _log_missing(missing: list[str]) -> None:
    with _lock:
        new = [module for module in missing if module not in _missing_logged]
        _missing_logged.update(new)
    if new:
        log.warning("task source not found for %s: their tasks are sent without checking arguments; %s",
                    ", ".join(new), MISSING_SOURCES_HINT)
