"""Other projects' Celery (and Flask) lines, run through our bootstrap so they reload as our roles do.

`celery -A app worker …` becomes `<the project's python> BOOTSTRAP celery -A app worker …`: the
interpreter is the one that would have run the line (a console script's shebang, or `python -m
celery`'s own python, or `uv run python` / `poetry run python` for a launcher), so the project's
virtualenv is used and dify-local need not be installed in it. runner/reload/bootstrap.py says what
it does there. A line this cannot rewrite faithfully (shell syntax, an unknown launcher, no -A) is
left as it is: it is cold-restarted on a change, as before.

Modes: "takeover" (a Celery worker or beat: a successor loads while the old one serves) and
"report" (`flask run`: only its imports are reported, so it restarts only when one of them changed).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from runner.supervisor.procfile import ProcessSpec
from runner.supervisor.process import ASSIGNMENT, shell_features

LAUNCHERS = {"uv": "run", "poetry": "run", "pipenv": "run", "pdm": "run", "hatch": "run", "rye": "run"}
PROGRAMS = ("celery", "flask")


def bootstrap_path() -> Path:
    """The bootstrap script, as a file the project's python can run (the binary carries it unpacked)."""
    if getattr(sys, "frozen", False):
        return Path(getattr(sys, "_MEIPASS", Path(sys.executable).parent)) / "runner" / "reload" / "bootstrap.py"
    return Path(__file__).resolve().with_name("bootstrap.py")


def _is_python(word: str) -> bool:
    name = Path(word).name
    return name.startswith("python") and name[6:].replace(".", "").isdigit() or name == "python"


def _interpreter_of(script: str, path: str) -> str | None:
    """The python a console script (`celery`, `.venv/bin/celery`) runs: its shebang's, or its folder's."""
    found = shutil.which(script, path=path) if os.sep not in script else script
    if not found:
        return None
    try:
        with open(found, "rb") as file:
            first = file.readline(512).decode("utf-8", "replace").strip()
    except OSError:
        return None
    if first.startswith("#!"):
        words = first[2:].split()
        if words and _is_python(words[0]) and os.path.isfile(words[0]):
            return words[0]
    for name in ("python", "python3"):  # a long shebang written as `#!/bin/sh` + exec: the venv's python
        sibling = Path(found).parent / name
        if sibling.is_file():
            return str(sibling)
    return None


def rewritten(spec: ProcessSpec, path: str) -> str | None:
    """The command that runs `spec` through the bootstrap, or None to run it as written."""
    compound, shell = shell_features(spec.command)
    if compound or shell or spec.is_ours:
        return None
    words = shlex.split(spec.command)
    assignments = []
    while words and ASSIGNMENT.match(words[0]):
        assignments.append(words.pop(0))
    if not words:
        return None
    head = Path(words[0]).name
    if LAUNCHERS.get(head) and len(words) > 2 and words[1] == LAUNCHERS[head] and Path(words[2]).name in PROGRAMS:
        prefix, program, rest = [*words[:2], "python"], Path(words[2]).name, words[3:]
    elif _is_python(words[0]) and len(words) > 2 and words[1] == "-m" and words[2] in PROGRAMS:
        prefix, program, rest = [words[0]], words[2], words[3:]
    elif head in PROGRAMS:
        python = _interpreter_of(words[0], path)
        if python is None:
            return None
        prefix, program, rest = [python], head, words[1:]
    else:
        return None
    if program == "celery":
        if not any(item in ("worker", "beat") for item in rest) or not _names_app(rest):
            return None
    elif "run" not in rest:  # `flask [--app web] run …`; its other commands are one-offs
        return None
    return shlex.join([*assignments, *prefix, str(bootstrap_path()), program, *rest])


def _names_app(args: list[str]) -> bool:
    return bool(os.environ.get("CELERY_APP")) or any(
        item in ("-A", "--app") or item.startswith("--app=") or (item.startswith("-A") and len(item) > 2)
        for item in args)


def bootstrapped(spec: ProcessSpec, env: dict[str, str]) -> ProcessSpec:
    """`spec` with its command run through the bootstrap where that can be done; argv and role stay
    the user's (probes, node names and `ps` read those)."""
    command = rewritten(spec, env.get("PATH", os.defpath))
    return spec if command is None else replace(spec, command=command)


def mode(spec: ProcessSpec) -> str | None:
    """"takeover", "report" or None (not run through the bootstrap). A takeover needs the line's role
    (procfile.describe): how it is probed and stopped, and whether old and new may overlap (beat not);
    a line whose role is not recognised only reports its imports and is restarted cold."""
    if spec.is_ours or str(bootstrap_path()) not in spec.command:
        return None
    return "takeover" if spec.role in ("worker", "beat") else "report"
