"""`init`: what a new project needs to start from the binary alone: a Procfile and local_config/."""

from __future__ import annotations

from pathlib import Path

import click

from runner.cli import CONFIG_ERROR, CliState, fail, main
from runner.settings.reference import render_defaults_env
from runner.supervisor.procfile import DEFAULT_PROCFILE, PROCFILE

LOCAL_ENV = """\
# Your settings for this machine (not committed): NAME=value lines, e.g.
#   CELERY_WORKER_AMOUNT=2
#   CELERY_BROKER_URL=redis://:password@127.0.0.1:6379/1   (a real Redis instead of the embedded one)
# local_config/defaults.env lists every setting with its default; `dify-local config` shows the
# effective values and where each came from.
"""
GITIGNORE = """\
# dify-local: the state folder (database, files, logs, broker data) and this machine's settings
.dify-local/
local_config/local.env
"""


def project_files() -> dict[str, str]:
    """Each file `init` writes (path relative to the project) and its content."""
    return {
        PROCFILE: DEFAULT_PROCFILE,
        "local_config/defaults.env": render_defaults_env(),
        "local_config/local.env": LOCAL_ENV,
        ".gitignore": GITIGNORE,
    }


KEPT_WITH_FORCE = {"local_config/local.env", ".gitignore"}  # the user's own: never overwritten


@main.command()
@click.argument("folder", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite the Procfile and local_config/defaults.env if they exist.")
@click.option("--dify", is_flag=True,
              help="In a Dify checkout's api/ folder: a Procfile of Dify's own api, worker (on the app's queues) "
                   "and beat.")
@click.pass_context
def init(ctx: click.Context, folder: Path | None, force: bool, dify: bool) -> None:
    """Write a Procfile (broker, api, worker, beat) and local_config/ into FOLDER (default: here)."""
    state: CliState = ctx.find_object(CliState)
    folder = (folder or state.project_dir or Path.cwd()).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        fail(f"{folder} is not a folder", CONFIG_ERROR)
    if dify:
        from runner.cli.init_dify import init_dify

        init_dify(folder, force)
        return
    files = project_files()
    existing = [name for name in files if (folder / name).exists()]
    if existing and not force:
        fail(f"{folder} has {', '.join(existing)} already; nothing was written "
             "(--force rewrites the Procfile and local_config/defaults.env, never local.env or .gitignore)")
    written, kept = [], []
    try:
        for name, content in files.items():
            path = folder / name
            if path.exists() and name in KEPT_WITH_FORCE:
                kept.append(name)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
            written.append(name)
    except OSError as error:
        fail(f"cannot write into {folder}: {error.strerror or error}; name a folder this user can write", CONFIG_ERROR)
    click.echo(f"wrote {', '.join(written)} in {folder}" + (f" (kept your {', '.join(kept)})" if kept else ""))
    here = folder == Path.cwd().resolve()
    click.echo("next: " + ("" if here else f"cd {folder} && ") + "dify-local up    "
               "(API, worker on all 16 queues, beat and an embedded broker; Ctrl-C stops them)")
