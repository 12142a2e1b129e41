"""Checking a request's args and kwargs against a task's signature before it is sent, so a
wrong call is a 400 now rather than a failed task later."""

from __future__ import annotations

import inspect
import typing
from typing import Any, Mapping

JSON_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
                   dict: "an object", list: "an array"}


class ArgumentError(ValueError):
    """`field` is where in the request the argument at fault is: args[i], kwargs.name, or args."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def signature_text(name: str, signature: inspect.Signature) -> str:
    return f"{name}{signature}"


def _fits(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected) or expected
    if expected is Any or expected is inspect.Parameter.empty:
        return True
    if origin is typing.Union or str(origin) == "types.UnionType":
        return any(_fits(value, option) for option in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (str, bool, dict, list):
        return isinstance(value, origin)
    return True  # a type JSON cannot express: the task checks it


def _describe(expected: Any) -> str:
    return JSON_TYPE_NAMES.get(typing.get_origin(expected) or expected, str(expected))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def check_arguments(name: str, signature: inspect.Signature, hints: Mapping[str, Any], args: list,
                    kwargs: dict) -> None:
    """Raise ArgumentError naming the argument and what it should be.

    `signature` and `hints` are the task's as its source defines them (runner.task_catalogue)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise ArgumentError(f"{error}; the task is {signature_text(name, signature)}",
                            "kwargs" if kwargs and not args else "args") from None
    for position, (parameter, value) in enumerate(bound.arguments.items()):
        expected = hints.get(parameter)
        if expected is not None and not _fits(value, expected):
            raise ArgumentError(
                f"argument {parameter!r} must be {_describe(expected)}, got {_json_type(value)}; "
                f"the task is {signature_text(name, signature)}",
                f"kwargs.{parameter}" if parameter in kwargs else f"args[{position}]")
