"""Effective settings: built-in defaults < local_config/ < environment < .env < command line.

`.env` (or the files `-e` names) is read as honcho reads it, and as honcho does it wins over the
process environment, so the values `up` hands its processes are the ones every command sees.
`load_settings` reads every layer, parses each value with its kind, runs the checks that involve
more than one setting, and returns a `Settings` that knows each value's source. Any bad value
raises `SettingsError` whose lines each name the variable, the value and what is allowed.

REDIS_PASSWORD that no layer sets is, for the embedded broker, the state folder's own random one
(runner.settings.generated), so `up`, its processes and every command in another terminal agree
on it without being told, and no one else knows it.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import quote

from honcho.environ import parse as honcho_parse

from runner.errors import ProblemsError
from runner.settings.envfile import EnvFileError, read_env_file, read_env_text
from runner.settings.generated import BrokerPasswordError, CannotMakeError, broker_password
from runner.settings.kinds import MASK, BrokerUrl, host_port, mask_url
from runner.settings.table import BY_NAME, SETTINGS, Setting
from runner.settings.tls_files import tls_file_problems
from runner.state import StatePaths

LOCAL_CONFIG_DIR = "local_config"
DEFAULT_ENV_FILES = (".env",)
EMBEDDED_BROKER_DB = 1  # Dify keeps Celery on Redis database 1 and its own cache on 0
EMBEDDED_CACHE_DB = 0


class SettingsError(ProblemsError):
    """Bad settings: each line names the variable, the value and what is allowed."""


STACK_ADDRESS_GROUPS = ("broker / backend", "embedded broker")
STACK_ADDRESS_SETTINGS = ("DIFY_BIND_ADDRESS", "DIFY_PORT")
GENERATED = "generated"  # the source of the state folder's own broker password
# Whether load_settings makes that password where there is none yet (see _generated_password):
NEVER = "never"  # a command that only looks (config, export, topology …): the folder stays as it is
IF_POSSIBLE = "if possible"  # a client of the broker (queues, doctor …): made unless the folder cannot take it
ALWAYS = "always"  # what starts the stack, a role of it or a job: made, or one line saying why not


@dataclass(frozen=True)
class Override:
    """A value given on the command line, with the flag that gave it."""

    raw: str
    flag: str


@dataclass(frozen=True)
class Value:
    value: Any
    source: str
    raw: str | None = None  # the text as given; None for a default


def shown(setting: Setting, text: str) -> str:
    """How a raw or formatted value may be printed: secrets masked."""
    if not setting.secret or not text:
        return text
    if isinstance(setting.kind, BrokerUrl):
        return mask_url(text)
    return MASK


class Settings:
    """The effective value of every setting, its source, and the values derived from them."""

    def __init__(self, values: dict[str, Value], project_dir: Path):
        self._values = values
        self.project_dir = project_dir

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name].value
        except KeyError:
            raise AttributeError(name) from None

    def source(self, name: str) -> str:
        return self._values[name].source

    def items(self) -> Iterator[tuple[Setting, Value]]:
        for setting in SETTINGS:
            yield setting, self._values[setting.name]

    def display(self, name: str, reveal: bool = False) -> str:
        setting = BY_NAME[name]
        text = setting.kind.format(self._values[name].value)
        return text if reveal else shown(setting, text)

    # -- derived values -------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        path = Path(self.DIFY_LOCAL_STATE_DIR).expanduser()
        return path if path.is_absolute() else self.project_dir / path

    def path(self, name: str) -> Path | None:
        """A file setting as a path (relative ones from the project folder); None when empty."""
        text = self._values[name].value
        if not text:
            return None
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.project_dir / path

    @property
    def uses_embedded_broker(self) -> bool:
        return not self.CELERY_BROKER_URL

    def embedded_url(self, db: int) -> str:
        # no password yet (see _generated_password), or a broker started with --no-password: no AUTH
        auth = f":{quote(self.REDIS_PASSWORD, safe='')}@" if self.REDIS_PASSWORD else ""
        return f"redis://{auth}{host_port(self.REDIS_HOST, self.REDIS_PORT)}/{db}"

    @property
    def broker_url(self) -> str:
        return self.CELERY_BROKER_URL or self.embedded_url(EMBEDDED_BROKER_DB)

    @property
    def result_backend_url(self) -> str:
        # CELERY_BACKEND=redis: results live on the broker's server, as in Dify.
        return self.broker_url

    @property
    def uses_ssl(self) -> bool:
        return self.BROKER_USE_SSL or self.broker_url.startswith("rediss://")

    @property
    def api_url(self) -> str:
        host = self.DIFY_BIND_ADDRESS
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{host_port(host, self.DIFY_PORT)}"

    @property
    def autoscale(self) -> tuple[int, int] | None:
        """(max, min) when autoscaling, as Celery's --autoscale=MAX,MIN takes them."""
        if not self.CELERY_AUTO_SCALE:
            return None
        return (self.CELERY_MAX_WORKERS or self.CELERY_WORKER_AMOUNT, self.CELERY_MIN_WORKERS
                if self.CELERY_MIN_WORKERS is not None else 1)

    def stack_address(self) -> dict[str, str]:
        """Every setting that says where a running stack is: its broker (embedded or real, with
        Sentinel and TLS) and its API. Kept by `up` for commands in other terminals, which may not
        share the flags or the environment it was started with: the whole group, so it stays coherent.
        A generated password stays in its own file, which those commands read themselves."""
        return {setting.name: setting.kind.format(value.value) for setting, value in self.items()
                if (setting.group in STACK_ADDRESS_GROUPS or setting.name in STACK_ADDRESS_SETTINGS)
                and not value.source.startswith(GENERATED)}

    def given(self) -> dict[str, str]:
        """The values someone set (local_config/, environment, .env, command line) as .env text:
        neither defaults nor the state folder's generated password."""
        return {setting.name: setting.kind.format(value.value) for setting, value in self.items()
                if not value.source.startswith(("default", GENERATED))}

    def command_line_environment(self) -> dict[str, str]:
        """Values given on the command line, as environment for child processes."""
        return {
            setting.name: setting.kind.format(value.value)
            for setting, value in self.items()
            if value.source.startswith("command line")
        }


def _local_config_files(project_dir: Path) -> list[Path]:
    folder = project_dir / LOCAL_CONFIG_DIR
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.glob("*.env") if path.is_file())


def _warn_unknown(name: str, where: str) -> None:
    close = difflib.get_close_matches(name, BY_NAME, n=1, cutoff=0.85)
    if close:
        print(f"warning: {where}: {name} is not a setting (ignored); did you mean {close[0]}?",
              file=sys.stderr)


def _default_source(setting: Setting, why: str = "") -> str:
    notes = [note for note in (setting.default_note, why) if note]
    return "default" + (f" ({'; '.join(notes)})" if notes else "")


NOT_TEXT = re.compile("[\ud800-\udfff\x00]")  # lone surrogates: how Python keeps bytes that are not UTF-8


def _parse(setting: Setting, raw: str, source: str) -> Value:
    if raw.strip() == "":
        # Blank means unset, as in Dify's .env.example: the default applies.
        return Value(setting.default_value(), _default_source(setting, f"empty in {source}"))
    if NOT_TEXT.search(raw):  # undecodable bytes from the environment or the command line, or a NUL
        raise SettingsError([f"{setting.name}={shown(setting, raw)!r} ({source}) is not allowed: it holds bytes "
                             "that are not UTF-8 (or a NUL); settings are UTF-8 text"])
    try:
        return Value(setting.kind.parse(raw), source, raw)
    except ValueError as error:
        raise SettingsError([f"{setting.name}={shown(setting, raw)!r} ({source}) is not allowed: {error}"]) from None


def _generated_password(values: dict[str, Value], settings: Settings, make: str) -> None:
    """REDIS_PASSWORD that no layer set: the state folder's own, for the embedded broker (a real
    broker's password is in CELERY_BROKER_URL). Made by the first command that starts or reaches
    the broker (`make`: NEVER, IF_POSSIBLE, ALWAYS), so a client started before the broker (a
    `queues --watch`) already has the one the broker will take; where there is none yet, no
    broker of this folder has started with one."""
    if not settings.uses_embedded_broker or not values["REDIS_PASSWORD"].source.startswith("default"):
        return
    path = StatePaths(settings.state_dir).broker_password
    try:
        password = broker_password(path, make != NEVER)
    except CannotMakeError as error:
        if make == ALWAYS:
            raise SettingsError([str(error)]) from None
        password = None  # a client: it reports the folder's trouble itself (doctor), or the broker's absence
    except BrokerPasswordError as error:
        raise SettingsError([str(error)]) from None
    values["REDIS_PASSWORD"] = (Value(password, f"{GENERATED}, {path}") if password is not None else
                                Value("", f"{GENERATED}, {path} (none yet: made when the broker first starts "
                                              "or is first reached)"))


def _cross_checks(settings: Settings) -> list[str]:
    """Checks that involve more than one setting, each failure one line."""
    problems = []
    low, high = settings.CELERY_MIN_WORKERS, settings.CELERY_MAX_WORKERS
    if low is not None and high is not None and low > high:
        problems.append(
            f"CELERY_MIN_WORKERS={low} is more than CELERY_MAX_WORKERS={high}: "
            "the autoscale floor must be at most its ceiling")
    url = settings.CELERY_BROKER_URL
    sentinel_url = url.startswith("sentinel://")
    if settings.CELERY_USE_SENTINEL:
        if not settings.CELERY_SENTINEL_MASTER_NAME:
            problems.append(
                "CELERY_SENTINEL_MASTER_NAME='' is not allowed with CELERY_USE_SENTINEL=true: "
                "name the master the sentinels watch (e.g. mymaster)")
        if not sentinel_url:
            problems.append(
                f"CELERY_BROKER_URL={mask_url(url)!r} is not allowed with CELERY_USE_SENTINEL=true: "
                "list the sentinels as sentinel://[:password@]host:port[;sentinel://…]")
    elif sentinel_url:
        problems.append(
            f"CELERY_BROKER_URL={mask_url(url)!r} names sentinels but CELERY_USE_SENTINEL=false: "
            "set CELERY_USE_SENTINEL=true and CELERY_SENTINEL_MASTER_NAME")
    if settings.BROKER_USE_SSL and not url:
        problems.append(
            "BROKER_USE_SSL=true is not allowed with the embedded broker (CELERY_BROKER_URL empty): "
            "it speaks plain TCP on loopback; set CELERY_BROKER_URL to a TLS Redis")
    if not (settings.BROKER_USE_SSL and not url):
        problems.extend(tls_file_problems(settings))
    size, overlap = settings.DIFY_LOCAL_CHUNK_SIZE, settings.DIFY_LOCAL_CHUNK_OVERLAP
    if overlap >= size:
        problems.append(f"DIFY_LOCAL_CHUNK_OVERLAP={overlap} is not allowed with DIFY_LOCAL_CHUNK_SIZE={size}: "
                        "the overlap must be less than the segment size")
    if size > settings.INDEXING_MAX_SEGMENTATION_TOKENS_LENGTH:
        problems.append(f"DIFY_LOCAL_CHUNK_SIZE={size} is more than INDEXING_MAX_SEGMENTATION_TOKENS_LENGTH="
                        f"{settings.INDEXING_MAX_SEGMENTATION_TOKENS_LENGTH}: the default segment size must be "
                        "within the largest allowed")
    embedder = settings.DIFY_LOCAL_EMBEDDER
    if embedder not in ("", "hashing") and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", embedder):
        problems.append(f"DIFY_LOCAL_EMBEDDER={embedder!r} is not allowed: hashing, or package.module:attribute "
                        "(a class or factory of an object with 'name' and 'embed(texts)')")
    if settings.MAIL_TYPE == "smtp" and not settings.SMTP_SERVER:
        problems.append("SMTP_SERVER='' is not allowed with MAIL_TYPE=smtp: name the SMTP host "
                        "(or MAIL_TYPE=outbox to write mail to the state folder)")
    if settings.CELERY_WORKER_CLASS == "gevent" and importlib.util.find_spec("gevent") is None:
        problems.append("CELERY_WORKER_CLASS='gevent' needs the gevent package, which is not installed: "
                        "pip install gevent, or use threads")
    return problems


def read_env_files(project_dir: Path, names: tuple[str, ...] = DEFAULT_ENV_FILES) -> dict[str, str]:
    """The variables of the project's .env files, parsed by honcho (missing files are skipped)."""
    values: dict[str, str] = {}
    for name in names:
        path = project_dir / name
        try:
            values.update(honcho_parse(read_env_text(path)))
        except FileNotFoundError:
            continue
        except EnvFileError as error:
            raise SettingsError([str(error)]) from None
        except (OSError, ValueError) as error:
            raise SettingsError([f"cannot read {path}: {error}"]) from None
    return values


def load_settings(
    project_dir: Path | str | None = None,
    overrides: Mapping[str, Override] | None = None,
    environ: Mapping[str, str] | None = None,
    env_files: tuple[str, ...] = DEFAULT_ENV_FILES,
    make_password: str = NEVER,
) -> Settings:
    """Read every layer and return the effective settings, or raise `SettingsError`.

    `make_password`: whether to make the state folder's broker password if it has none
    (NEVER, IF_POSSIBLE, ALWAYS; see _generated_password)."""
    project = Path(project_dir or os.getcwd()).resolve()
    env = os.environ if environ is None else environ
    dotenv = read_env_files(project, env_files)
    overrides = overrides or {}
    unknown = [name for name in overrides if name not in BY_NAME]
    if unknown:
        raise SettingsError([f"{name} is not a setting; `dify-local config` lists them all" for name in unknown])

    values = {setting.name: Value(setting.default_value(), _default_source(setting)) for setting in SETTINGS}
    problems: list[str] = []

    def apply(name: str, raw: str, source: str) -> None:
        try:
            values[name] = _parse(BY_NAME[name], raw, source)
        except SettingsError as error:
            problems.extend(error.lines)

    for path in _local_config_files(project):
        try:
            assignments = read_env_file(path)
        except EnvFileError as error:
            problems.append(str(error))
            continue
        for assignment in assignments:
            where = f"{LOCAL_CONFIG_DIR}/{path.name}:{assignment.line}"
            if assignment.name in BY_NAME:
                apply(assignment.name, assignment.value, where)
            else:
                _warn_unknown(assignment.name, where)
    for setting in SETTINGS:
        if setting.name in dotenv:
            apply(setting.name, dotenv[setting.name], " or ".join(env_files))
        elif setting.name in env:
            apply(setting.name, env[setting.name], "environment")
    for name, override in overrides.items():
        apply(name, override.raw, f"command line ({override.flag})")
    if problems:
        raise SettingsError(problems)

    settings = Settings(values, project)
    problems = _cross_checks(settings)
    if problems:
        raise SettingsError(problems)
    _generated_password(values, settings, make_password)
    return settings
