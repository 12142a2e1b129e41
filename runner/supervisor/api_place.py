"""dify-local's API beside another project's processes: whether `up` adds it, and on which port.

A Procfile that runs none of our roles still gets our API (the dashboard, /health, /v1/beat for
the stack), as it gets the broker, under the name `dashboard`: unless `up` is given the names of
the processes to run. When a web process of the project listens on our port (DIFY_PORT: Dify's own
Flask uses 5001 too), or something else holds it and the API is ours to place, the API moves to a
free port; `up` records it in the state folder, so commands in other terminals find it.
"""

from __future__ import annotations

import os
import socket

from runner.another_project import runs_our_backend
from runner.settings import Settings
from runner.supervisor.foreign_readiness import web_address
from runner.supervisor.preflight import port_in_use
from runner.supervisor.procfile import ProcessSpec, describe

OUR_API_COMMAND = "dify-local serve api"
NAMES = ("dashboard", "dify-local-api")


def with_our_api(specs: list[ProcessSpec], names_given: bool) -> tuple[list[ProcessSpec], ProcessSpec | None]:
    """The processes to run, our API added for a project that runs none of our roles."""
    if names_given or runs_our_backend(specs):
        return specs, None
    taken = {spec.process_type for spec in specs} | {spec.name for spec in specs}
    name = next((name for name in NAMES if name not in taken), None)
    if name is None:
        return specs, None
    api = describe(name, OUR_API_COMMAND)
    return [*specs, api], api


def _places_itself(spec: ProcessSpec) -> bool:
    return any(word in ("--port", "--host") or word.startswith(("--port=", "--host=")) for word in spec.argv)


def port_holder(specs: list[ProcessSpec], settings: Settings, dotenv: dict[str, str],
                added: ProcessSpec | None) -> str | None:
    """Who holds our API's port (a process of the project by name, or "" for something else when the
    API is the one `up` added), when our API is to move from it; None when it keeps it (an API line
    naming its own port keeps that)."""
    if not any(spec.is_ours and spec.role == "api" and not _places_itself(spec) for spec in specs):
        return None
    for spec in specs:
        if spec.is_ours:
            continue
        address = web_address(spec.argv, {**os.environ, **dotenv, **spec.env})
        if address is not None and address.port == settings.DIFY_PORT:
            return spec.name
    if added is not None and port_in_use(settings.DIFY_BIND_ADDRESS, settings.DIFY_PORT):
        return ""
    return None


NEXT_PORTS = 20  # tried after the one asked for, so the dashboard keeps its address from one `up` to the next


def free_port(host: str, asked: int, specs: list[ProcessSpec], dotenv: dict[str, str]) -> int:
    """The first free port after `asked` that no web line of the project names, else any free one."""
    named = {address.port for spec in specs if not spec.is_ours
             for address in [web_address(spec.argv, {**os.environ, **dotenv, **spec.env})] if address}
    for port in range(asked + 1, min(asked + 1 + NEXT_PORTS, 65536)):
        if port not in named and not port_in_use(host, port):
            return port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
