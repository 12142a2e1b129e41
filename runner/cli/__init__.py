"""The `dify-local` command: every subcommand reads settings the same way, and a bad value stops
it before anything starts, with one line per problem and exit status 2."""

from __future__ import annotations

import errno
import math
import sys
from pathlib import Path
from typing import Any

import click

from runner import __version__
from runner.errors import StateError
from runner.process_env import ENV_FILES
from runner.settings import BY_NAME, Override, Settings, SettingsError, load_settings
from runner.settings.loader import GENERATED, LOCAL_CONFIG_DIR, NEVER
from runner.supervisor.control import moved_api, running_stack_settings

CONFIG_ERROR = 2



class CliState:
    def __init__(self, project_dir: Path | None, assignments: dict[str, Override], env_files: tuple[str, ...]):
        self.project_dir = project_dir
        self.assignments = assignments
        self.env_files = env_files


def fail(message: str, status: int = 1) -> None:
    click.echo(f"dify-local: {message}", err=True)
    sys.exit(status)


def settings_from(ctx: click.Context, follow_stack: bool = True, make_password: str = NEVER,
                  **flags: tuple[str, str, object]) -> Settings:
    """Effective settings with `--set` values and this command's own flags (flag, name, value) on top.

    `follow_stack`: when an `up` runs for the same state folder, where its broker and API are
    (`up --port 5002 --broker redis://…`, or the same from its environment) replaces the project's
    defaults, local_config/ and generated password here, not what this terminal sets itself
    (flags, environment, .env): `doctor` or `queues` in another terminal look at the stack that
    runs. `up` and the roles it starts do not.

    `make_password`: whether the state folder's broker password is made if it has none yet:
    ALWAYS for what starts the stack, a role of it or a job; IF_POSSIBLE for a client of the
    broker; NEVER (the default) for a command that only looks.
    """
    state: CliState = ctx.find_object(CliState)
    overrides = dict(state.assignments)
    for flag, name, value in flags.values():
        if value is not None:
            overrides[name] = Override(str(value), flag)
    try:
        settings = load_settings(state.project_dir, overrides, env_files=state.env_files, make_password=make_password)
        stack = running_stack_settings(settings.state_dir) if follow_stack else None
        if stack is not None:
            pid, given = stack
            # only where this terminal says nothing itself (its flags, environment or .env win)
            sources = {setting.name: value.source for setting, value in settings.items()}
            inherited = {name: Override(value, f"of the running `up`, pid {pid}")
                         for name, value in given.items()
                         if sources.get(name, "").startswith(("default", LOCAL_CONFIG_DIR, GENERATED))
                         and BY_NAME[name].kind.format(getattr(settings, name)) != value}
            moved = moved_api(settings.state_dir)
            if moved is not None and "DIFY_PORT" not in overrides and settings.DIFY_PORT == moved[0]:
                # that port is taken (the project's own web process): our API is where `up` put it
                inherited["DIFY_PORT"] = Override(str(moved[1]), f"of the running `up`, pid {pid}, "
                                                                 f"as port {moved[0]} was taken")
            if inherited:
                settings = load_settings(state.project_dir, {**inherited, **overrides}, env_files=state.env_files,
                                         make_password=make_password)
        return settings
    except SettingsError as error:
        for line in error.lines:
            click.echo(f"dify-local: {line}", err=True)
        sys.exit(CONFIG_ERROR)


def _parse_assignments(ctx, param, values) -> dict[str, Override]:
    parsed = {}
    for value in values:
        name, sep, raw = value.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{value!r} is not NAME=VALUE", ctx=ctx, param=param)
        parsed[name.strip()] = Override(raw, "--set")
    return parsed


class Seconds(click.ParamType):
    """A finite number of seconds above `least` (or from it, `included`) up to `most`: click's
    FloatRange lets 'nan' and 'inf' through."""

    name = "seconds"

    def __init__(self, most: float, least: float = 0.0, included: bool = False):
        self.most, self.least, self.included = most, least, included

    def convert(self, value: Any, param, ctx) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        above = seconds >= self.least if self.included else seconds > self.least
        if math.isnan(seconds) or not above or seconds > self.most:
            low = f"at least {self.least:g}" if self.included else f"more than {self.least:g}"
            self.fail(f"{value!r} is not allowed: {low} and at most {self.most:g} seconds", param, ctx)
        return seconds


def describe_os_error(error: OSError) -> str:
    """One line for a file the command could not use, with what to do where the error says."""
    where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    text = f"{where}: {error.strerror or error}" if where else str(error.strerror or error)
    hint = {errno.EACCES: "make it writable by this user, or choose another path",
            errno.EPERM: "make it writable by this user, or choose another path",
            errno.EROFS: "that file system is read-only: choose a path on another",
            errno.ENOSPC: "free some space on that disk",
            errno.EDQUOT: "free some space, or raise the quota",
            errno.ENOENT: "check the path",
            errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.EISDIR: "that is a folder; name a file"}.get(error.errno)
    return f"{text} ({hint})" if hint else text


class Main(click.Group):
    """The `dify-local` group: every error ends a command with one line, never a traceback: bad
    arguments (click's usage errors, exit status 2, without click's usage lines), a state folder it
    cannot use (StateError), a file the system refuses (OSError)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as error:
            hint = f" (`{error.ctx.command_path} --help` shows what it takes)" if error.ctx is not None else ""
            click.echo(f"dify-local: {error.format_message().rstrip('.')}{hint}", err=True)
            sys.exit(error.exit_code)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StateError as error:
            fail(str(error), error.exit_status)
        except BrokenPipeError:  # `dify-local … | head`: the reader has gone, nothing to say
            sys.stderr.close()
            sys.exit(1)
        except OSError as error:
            fail(describe_os_error(error))
        except UnicodeError as error:  # a name from bytes that are not UTF-8, where only UTF-8 goes
            fail(f"{error.reason} ({error.object[error.start:error.end]!r}): a name or value that is not UTF-8 "
                 "text; use UTF-8", CONFIG_ERROR)


@click.group(cls=Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="dify-local")
@click.option("--project-dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              envvar="DIFY_LOCAL_PROJECT_DIR", help="Folder with the Procfile and local_config/ (default: here).")
@click.option("-s", "--set", "assignments", multiple=True, metavar="NAME=VALUE", callback=_parse_assignments,
              help="Override a setting for this command (repeatable).")
@click.option("-e", "--env", "env_files", default=".env", show_default=True, envvar=ENV_FILES,
              metavar="FILE[,FILE]", help="Environment files of the project, read as honcho reads them.")
@click.pass_context
def main(ctx: click.Context, project_dir: Path | None, assignments: dict[str, Override], env_files: str) -> None:
    """Dify's Celery backend on one machine: API, worker on all 16 queues, beat, embedded broker."""
    ctx.obj = CliState(project_dir, assignments, tuple(name.strip() for name in env_files.split(",") if name.strip()))


from runner.cli import (  # noqa: E402, F401  (importing a command module registers its commands)
    broker_commands,
    control_commands,
    doctor_command,
    export_command,
    failed_commands,
    init_command,
    inspect_commands,
    monitor_commands,
    run_commands,
    serve_commands,
)

__all__ = ["main"]
