"""The `dify-local` command: every subcommand reads settings the same way, and a bad value stops
it before anything starts, with one line per problem and exit status 2."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from runner import __version__
from runner.process_env import ENV_FILES
from runner.settings import BY_NAME, Override, Settings, SettingsError, load_settings
from runner.settings.loader import GENERATED, LOCAL_CONFIG_DIR, NEVER
from runner.supervisor.control import running_stack_settings

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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
