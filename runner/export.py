"""`dify-local export systemd|supervisord|compose DIR`: the same Procfile on real machines.

The exported processes run against a real Redis (the embedded broker is left out: it is for one
laptop). Celery workers are stopped as Celery wants: SIGTERM to the main process only (a warm
shutdown: running tasks finish, prefetched ones go back to the queue), and only after a timeout
is the rest of the process group killed. Never SIGQUIT, which drops running tasks.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from runner.process_env import PROCESS_NAME
from runner.supervisor.options import ProcessOptions
from runner.supervisor.procfile import ProcessSpec

FORMATS = ("systemd", "supervisord", "compose")
PLACEHOLDER_BROKER = "redis://:CHANGE-ME@redis-host:6379/1"
COMPOSE_BROKER = "redis://:{password}@redis:6379/1"


@dataclass(frozen=True)
class ExportedProcess:
    name: str
    command: str  # for a shell: the program and its arguments
    replicas: int
    stop_signal: str
    stop_timeout: int
    is_worker: bool


def app_name(project_dir: Path) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", project_dir.name.lower()).strip("-") or "dify-local"


def plan(specs: list[ProcessSpec], scale: dict[str, int], options: dict[str, ProcessOptions],
         worker_grace: int, grace: int) -> list[ExportedProcess]:
    """Every Procfile process but the embedded broker, with how it is to be stopped."""
    here = Path(sys.executable).parent / "dify-local"
    program = str(here) if here.exists() else "dify-local"
    exported = []
    for spec in specs:
        if spec.role == "broker":
            continue
        command = spec.command
        if spec.is_ours:  # this installation's dify-local, by its full path
            command = shlex.join([program, *spec.argv[1:]])
        option = options.get(spec.process_type, ProcessOptions())
        is_worker = spec.role == "worker"
        timeout = option.stop_timeout or (worker_grace if is_worker else grace)
        signal_name = option.stop_signal.name if option.stop_signal else "SIGTERM"
        exported.append(ExportedProcess(spec.process_type, command, scale.get(spec.process_type, 1), signal_name,
                                        int(timeout), is_worker))
    return exported


def environment_file(values: dict[str, str]) -> str:
    lines = ["# Settings for the exported processes (readable by its owner only: it holds the broker's password)"]
    lines += [f"{name}={shlex.quote(value)}" for name, value in sorted(values.items())]
    return "\n".join(lines) + "\n"


def systemd(app: str, processes: list[ExportedProcess], project_dir: Path, env_path: Path) -> dict[str, str]:
    units: dict[str, str] = {}
    wants = []
    for process in processes:
        for index in range(1, process.replicas + 1):
            instance = process.name if process.replicas == 1 else f"{process.name}.{index}"
            unit = f"{app}-{instance}.service"
            wants.append(unit)
            kill = (
                # TERM to the main process only; what is left of the group is killed after the timeout
                "KillMode=mixed\n" if process.is_worker else "KillMode=control-group\n")
            units[unit] = (
                f"[Unit]\nDescription={app}: {instance}\nPartOf={app}.target\nAfter=network-online.target\n\n"
                f"[Service]\nWorkingDirectory={project_dir}\nEnvironmentFile={env_path}\n"
                f"Environment={PROCESS_NAME}={instance}\nEnvironment=PYTHONUNBUFFERED=1\n"
                f"ExecStart=/bin/sh -c {shlex.quote('exec ' + process.command)}\n"
                f"Restart=always\nRestartSec=2\nKillSignal={process.stop_signal}\n{kill}"
                f"TimeoutStopSec={process.stop_timeout}\nStandardOutput=journal\nStandardError=journal\n"
                f"SyslogIdentifier={app}-{instance}\n\n[Install]\nWantedBy={app}.target\n")
    units[f"{app}.target"] = (f"[Unit]\nDescription={app}: every process of its Procfile\nWants={' '.join(wants)}\n\n"
                              "[Install]\nWantedBy=multi-user.target\n")
    return units


def supervisord(app: str, processes: list[ExportedProcess], project_dir: Path, env: dict[str, str]) -> dict[str, str]:
    environment = ",".join(f'{name}="{value}"' for name, value in sorted(env.items()) if '"' not in value)
    sections = [f"[group:{app}]\nprograms={','.join(p.name for p in processes)}\n"]
    for process in processes:
        name_expression = "%(program_name)s" if process.replicas == 1 else "%(program_name)s.%(process_num)d"
        sections.append(
            f"[program:{process.name}]\ncommand=/bin/sh -c {shlex.quote('exec ' + process.command)}\n"
            f"directory={project_dir}\nprocess_name={name_expression}\nnumprocs={process.replicas}\n"
            f'environment={environment},{PROCESS_NAME}="{name_expression}",PYTHONUNBUFFERED="1"\n'
            f"autostart=true\nautorestart=true\nstartsecs=2\n"
            f"stopsignal={process.stop_signal.removeprefix('SIG')}\nstopwaitsecs={process.stop_timeout}\n"
            # TERM to the main process alone (a worker manages its own pool); kill the group only
            # when the timeout is over
            f"stopasgroup=false\nkillasgroup=true\nredirect_stderr=true\n")
    return {f"{app}.conf": "\n".join(sections)}


def _yaml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a YAML scalar, quoting included


def compose(app: str, processes: list[ExportedProcess], env_name: str) -> dict[str, str]:
    # Redis' password comes from the owner-only env file (REDIS_PASSWORD, as in Dify's own compose
    # file), not from compose.yaml, which others may read; $$ is a `$` for the container's shell,
    # which refuses to start Redis without one.
    start_redis = f'exec redis-server --requirepass "$${{REDIS_PASSWORD:?set REDIS_PASSWORD in {env_name}}}"'
    lines = [f"# {app}: the Procfile's processes against a real Redis", "name: " + _yaml(app), "services:",
             "  redis:", "    image: redis:7", "    command: " + json.dumps(["/bin/sh", "-c", start_redis]),
             "    env_file: " + _yaml(env_name), "    restart: unless-stopped"]
    for process in processes:
        lines += [
            f"  {process.name}:",
            "    image: ${DIFY_LOCAL_IMAGE:-" + app + "}  # an image with your project and dify-local installed",
            "    command: " + json.dumps(["/bin/sh", "-c", "exec " + process.command]),
            "    env_file: " + _yaml(env_name),
            "    environment:",
            f"      {PROCESS_NAME}: " + _yaml(process.name),
            "      PYTHONUNBUFFERED: \"1\"",
            "    depends_on: [redis]",
            "    restart: unless-stopped",
            "    init: true",
            f"    stop_signal: {process.stop_signal}",
            f"    stop_grace_period: {process.stop_timeout}s",
        ]
        if process.replicas > 1:
            lines += ["    deploy:", f"      replicas: {process.replicas}"]
    return {"compose.yaml": "\n".join(lines) + "\n"}


def write(folder: Path, files: dict[str, str], private: set[str]) -> list[Path]:
    """Write the files into `folder`; the `private` ones (they hold passwords) owner-only from the
    moment they exist, not after."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = folder / name
        perms = 0o600 if name in private else 0o644  # private: owner-only from the start (the password)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, perms),
                       "w", encoding="utf-8") as out:
            if name in private:
                os.fchmod(out.fileno(), perms)  # a file that was there keeps its mode otherwise
            out.write(text)
        written.append(path)
    return written
