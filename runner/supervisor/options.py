"""How `up` runs each Procfile process: readiness probe, stop signal and timeout, restart policy.

Read from `local_config/processes.toml`, one table per process type, every key optional:

    [web]
    ready = "http://127.0.0.1:8000/health"  # or "tcp://127.0.0.1:8000", or "log:Listening on .*"
    ready_timeout = 60                       # seconds before it is reported as not ready
    stop_signal = "SIGINT"                   # what asks it to stop (default SIGTERM)
    stop_timeout = 20                        # seconds before it is forced (default: up --grace)
    restart = "always"                       # always | on-failure | never (one-off jobs: never)
    reload = ["*.py", "templates/*"]          # changed files that restart it under `up` (default *.py;
                                             # false: never). dify-local's own roles reload by their imports.
"""

from __future__ import annotations

import re
import signal
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from runner.capped_files import FileTooLarge, read_text_capped
from runner.errors import ProblemsError

OPTIONS_FILE = Path("local_config") / "processes.toml"
RESTART_POLICIES = ("always", "on-failure", "never")
MAX_OPTIONS_FILE = 1 << 20  # bytes (a few tables); tomllib reads whatever it is given
KEYS = ("ready", "ready_timeout", "stop_signal", "stop_timeout", "restart", "reload")


class ProcessOptionsError(ProblemsError):
    """Bad process options: each line names the file, the process, the option and what is allowed."""


@dataclass(frozen=True)
class ProcessOptions:
    ready: str | None = None
    ready_timeout: float | None = None
    stop_signal: signal.Signals | None = None
    stop_timeout: float | None = None
    restart: str = "always"
    reload: tuple[str, ...] | None = None  # globs of changed files that restart it; None: the default


def _probe(value: object) -> str:
    allowed = "http(s)://host:port/path (answers 2xx/3xx), tcp://host:port (accepts), or log:REGEX (a line matches)"
    if not isinstance(value, str):
        raise ValueError(allowed)
    if value.startswith("log:"):
        try:
            re.compile(value[4:])
        except re.error as error:
            raise ValueError(f"the regular expression does not compile ({error}); allowed: {allowed}") from None
        return value
    split = urlsplit(value)
    try:
        port = split.port
    except ValueError:
        port = None
    if split.scheme in ("http", "https") and split.hostname:
        return value
    if split.scheme == "tcp" and split.hostname and port:
        return value
    raise ValueError(allowed)


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError("a number of seconds greater than 0")
    return float(value)


def _signal(value: object) -> signal.Signals:
    allowed = "a signal name such as SIGTERM, SIGINT, SIGQUIT or SIGHUP"
    if not isinstance(value, str):
        raise ValueError(allowed)
    name = value.upper() if value.upper().startswith("SIG") else f"SIG{value.upper()}"
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(allowed) from None


def _restart(value: object) -> str:
    if value not in RESTART_POLICIES:
        raise ValueError("one of " + ", ".join(RESTART_POLICIES))
    return value  # type: ignore[return-value]


def _reload(value: object) -> tuple[str, ...] | None:
    if value is True:
        return None
    if value is False:
        return ()
    if isinstance(value, list) and value and all(isinstance(item, str) and item for item in value):
        return tuple(value)
    raise ValueError('true, false, or a list of file globs such as ["*.py", "templates/*.html"]')


PARSERS = {"ready": _probe, "ready_timeout": _seconds, "stop_signal": _signal, "stop_timeout": _seconds,
           "restart": _restart, "reload": _reload}


def load_process_options(project_dir: Path, process_types: list[str]) -> dict[str, ProcessOptions]:
    """Options per process type; types without a table get the defaults."""
    path = project_dir / OPTIONS_FILE
    options = {name: ProcessOptions() for name in process_types}
    if not path.exists():
        return options
    where = str(OPTIONS_FILE)
    try:
        document = tomllib.loads(read_text_capped(path, MAX_OPTIONS_FILE, str(OPTIONS_FILE)))
    except FileTooLarge as error:
        raise ProcessOptionsError([str(error)]) from None
    except OSError as error:
        raise ProcessOptionsError([f"cannot read {where}: {error.strerror or error}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ProcessOptionsError([f"{where} is not valid TOML: {error}"]) from None
    except RecursionError:  # tomllib recurses into each nested array or inline table
        raise ProcessOptionsError([f"{where} nests arrays or tables too deep to read (its tables hold "
                                   "a few plain values)"]) from None
    problems = []
    for name, table in document.items():
        if name not in options:
            problems.append(f"{where}: [{name}] names no process of the Procfile; it has: {', '.join(process_types)}")
            continue
        if not isinstance(table, dict):
            problems.append(f"{where}: {name} must be a table, [{name}]")
            continue
        values = {}
        for key, value in table.items():
            if key not in PARSERS:
                problems.append(f"{where}: [{name}] {key} is not an option; allowed: {', '.join(KEYS)}")
                continue
            try:
                values[key] = PARSERS[key](value)
            except ValueError as error:
                problems.append(f"{where}: [{name}] {key}={value!r} is not allowed: {error}")
        options[name] = ProcessOptions(**values)
    if problems:
        raise ProcessOptionsError(problems)
    return options
