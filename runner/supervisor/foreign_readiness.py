"""What an other project's process must show before it counts as ready, read from its command line
without changing its code: where its web server listens, and where Celery beat keeps its schedule.

A launcher in front (`uv run`, `poetry run`, `python -m flask`, `.venv/bin/gunicorn`) is looked
through: the program's own words are those after its name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# honcho gives each process $PORT; a Procfile line often names it ($PORT, ${PORT})
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
# the servers whose defaults we know: program → (default host, default port)
SERVER_DEFAULTS = {
    "gunicorn": ("127.0.0.1", 8000), "hypercorn": ("127.0.0.1", 8000), "uvicorn": ("127.0.0.1", 8000),
    "daphne": ("127.0.0.1", 8000), "granian": ("127.0.0.1", 8000), "waitress-serve": ("0.0.0.0", 8080),
}
FLASK_DEFAULT = ("127.0.0.1", 5000)
RUNSERVER_DEFAULT = ("127.0.0.1", 8000)
# Celery beat's PersistentScheduler keeps its schedule in a shelve under this name (-s), in one of
# these files depending on the dbm module (Celery's PersistentScheduler.known_suffixes, and none)
BEAT_SCHEDULE_DEFAULT = "celerybeat-schedule"
BEAT_SCHEDULE_SUFFIXES = ("", ".db", ".dat", ".dir", ".bak")
BEAT_STARTING = "beat: Starting..."  # logged by beat's service at INFO, just before its loop
BEAT_BANNER = "LocalTime -> "  # printed (unless -q) once the app and its tasks are imported


@dataclass(frozen=True)
class Address:
    host: str  # where to connect: a wildcard address becomes loopback
    port: int


def expand(text: str, env: dict[str, str]) -> str:
    return VARIABLE.sub(lambda match: env.get(match.group(1) or match.group(2), ""), text)


def option(words: list[str], *names: str) -> str | None:
    """The value of the first of `names` (`-p 5`, `-p5`, `--port 5`, `--port=5`) in `words`."""
    for index, word in enumerate(words):
        for name in names:
            if word == name and index + 1 < len(words):
                return words[index + 1]
            if name.startswith("--") and word.startswith(name + "="):
                return word.split("=", 1)[1]
            if not name.startswith("--") and word.startswith(name) and len(word) > len(name) \
                    and not word.startswith("--"):
                return word[len(name):]
    return None


def program_words(argv: tuple[str, ...] | list[str], *names: str) -> tuple[str, list[str]] | None:
    """(the program, its words) for the first of `names` in argv: run directly, by path, through a
    launcher (`uv run gunicorn …`) or as a module (`python -m flask …`)."""
    for index, word in enumerate(argv):
        if Path(word).name in names:
            return Path(word).name, list(argv[index + 1:])
        if word == "-m" and index + 1 < len(argv) and argv[index + 1] in names:
            return argv[index + 1], list(argv[index + 2:])
    return None


def _host(text: str) -> str:
    text = text.strip("[]")
    if text in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    return "::1" if text == "::" else text


def _host_port(text: str, default: tuple[str, int]) -> Address | None:
    """'host:port', ':port', 'port' or 'host' (unix:… is no TCP port)."""
    if text.startswith(("unix:", "fd://")) or "/" in text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = (default[0], text) if text.isdigit() else (text, str(default[1]))
    return Address(_host(host or default[0]), int(port)) if port.isdigit() else None


def web_address(argv: tuple[str, ...], env: dict[str, str]) -> Address | None:
    """Where a web process listens, or None for a process that is not one we recognise.

    A known server (flask run, gunicorn, uvicorn, hypercorn, waitress, daphne, granian, Django's
    runserver) with its options and defaults; else one whose command names $PORT, on $PORT."""
    words = [expand(word, env) for word in argv]
    found = program_words(words, "flask")
    if found and "run" in found[1]:
        run = found[1][found[1].index("run") + 1:]
        port = option(run, "--port", "-p") or env.get("FLASK_RUN_PORT") or str(FLASK_DEFAULT[1])
        host = option(run, "--host", "-h") or env.get("FLASK_RUN_HOST") or FLASK_DEFAULT[0]
        return Address(_host(host), int(port)) if port.isdigit() else None
    found = program_words(words, *SERVER_DEFAULTS)
    if found:
        program, rest = found
        default = SERVER_DEFAULTS[program]
        if program == "gunicorn" and env.get("PORT", "").isdigit():
            default = ("0.0.0.0", int(env["PORT"]))  # gunicorn binds $PORT when given no --bind
        if program in ("gunicorn", "hypercorn"):
            bind = option(rest, "--bind", "-b")
            return _host_port(bind, default) if bind else Address(_host(default[0]), default[1])
        if program == "waitress-serve" and option(rest, "--listen"):
            return _host_port(option(rest, "--listen"), default)
        if option(rest, "--uds", "--fd"):
            return None
        host = option(rest, "--host", "--interface", "-b") or env.get("UVICORN_HOST") or default[0]
        port = option(rest, "--port", "-p") or env.get("UVICORN_PORT") or str(default[1])
        return Address(_host(host), int(port)) if port.isdigit() else None
    if "manage.py" in {Path(word).name for word in words} and "runserver" in words:
        after = [word for word in words[words.index("runserver") + 1:] if not word.startswith("-")]
        return _host_port(after[0], RUNSERVER_DEFAULT) if after else Address(*RUNSERVER_DEFAULT)
    if any(VARIABLE.search(word) and "PORT" in word for word in argv) and env.get("PORT", "").isdigit():
        return Address("127.0.0.1", int(env["PORT"]))
    return None


@dataclass(frozen=True)
class BeatSchedule:
    files: tuple[Path, ...]  # the schedule's files, where the default scheduler keeps it; () for another


def beat_schedule(argv: tuple[str, ...], cwd: str, env: dict[str, str]) -> BeatSchedule:
    """Where a `celery … beat` line's PersistentScheduler writes its schedule (-s, --workdir),
    none when -S names another scheduler (a database's, redbeat)."""
    found = program_words([expand(word, env) for word in argv], "celery")
    words = found[1] if found else []
    scheduler = option(words, "--scheduler", "-S")
    if scheduler and scheduler.rsplit(":", 1)[-1].rsplit(".", 1)[-1] != "PersistentScheduler":
        return BeatSchedule(())
    base = Path(cwd) / (option(words, "--workdir") or ".")
    path = base / (option(words, "--schedule", "-s") or BEAT_SCHEDULE_DEFAULT)
    return BeatSchedule(tuple(Path(f"{path}{suffix}") for suffix in BEAT_SCHEDULE_SUFFIXES))
