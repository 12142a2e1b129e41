"""`export`: units that run the project's Procfile on real machines against a real Redis."""

from __future__ import annotations

import secrets
from pathlib import Path

import click

from runner.cli import CONFIG_ERROR, CliState, fail, main, settings_from

MOST_SECONDS = 24 * 3600  # --worker-grace and --grace: a day; systemd and supervisord take larger ones badly


@main.command("export")
@click.argument("format_name", metavar="FORMAT", type=click.Choice(["systemd", "supervisord", "compose"]))
@click.argument("folder", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--broker", "broker_url", metavar="URL", help="The real Redis to use (CELERY_BROKER_URL).")
@click.option("-f", "--procfile", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Procfile to export (default: the project's, or the built-in Dify stack).")
@click.option("--scale", "scale", multiple=True, metavar="NAME=N", help="Replicas of a process type; repeatable.")
@click.option("--app", "app", help="Name of the exported units (default: the project folder's name).")
@click.option("--worker-grace", type=click.IntRange(1, MOST_SECONDS), default=600, show_default=True,
              help="Seconds a Celery worker gets to finish its running tasks when stopped.")
@click.option("--grace", type=click.IntRange(1, MOST_SECONDS), default=10, show_default=True,
              help="Seconds any other process gets to stop.")
@click.pass_context
def export(ctx: click.Context, format_name: str, folder: Path, broker_url, procfile, scale, app, worker_grace,
           grace) -> None:
    """Write systemd units, a supervisord config or a docker-compose file for the Procfile, running
    against a real Redis (no embedded broker); workers stop with TERM and a timeout, never QUIT."""
    from runner import export as exporter
    from runner.settings.loader import read_env_files
    from runner.supervisor.options import ProcessOptionsError, load_process_options
    from runner.supervisor.procfile import ProcfileError, load_procfile, parse_scale

    settings = settings_from(ctx, broker=("--broker", "CELERY_BROKER_URL", broker_url))
    try:
        specs, source = load_procfile(settings.project_dir, procfile)
        types = [spec.process_type for spec in specs]
        replicas = parse_scale(scale, types)
        options = load_process_options(settings.project_dir, types)
    except ProcfileError as error:
        fail(str(error), CONFIG_ERROR)
    except ProcessOptionsError as error:
        fail("; ".join(error.lines), CONFIG_ERROR)
    app = app or exporter.app_name(settings.project_dir)
    processes = exporter.plan(specs, replicas, options, worker_grace, grace)
    env = read_env_files(settings.project_dir, ctx.find_object(CliState).env_files)
    env.update(settings.given())  # not the generated broker password: that one is this machine's
    warning = None
    if format_name == "compose" and settings.uses_embedded_broker:
        password = secrets.token_urlsafe(18)  # the compose file's own Redis: a password of its own
        env["CELERY_BROKER_URL"] = exporter.COMPOSE_BROKER.format(password=password)
        env["REDIS_PASSWORD"] = password
    else:
        if settings.uses_embedded_broker:
            env["CELERY_BROKER_URL"] = exporter.PLACEHOLDER_BROKER
            warning = (f"no real Redis is configured: edit CELERY_BROKER_URL ({exporter.PLACEHOLDER_BROKER}) in the "
                       "written settings, or export again with --broker redis://…")
    env_name = f"{app}.env"
    if format_name == "systemd":
        files = exporter.systemd(app, processes, settings.project_dir, folder.resolve() / env_name)
        files[env_name] = exporter.environment_file(env)
        private = {env_name}
        hint = (f"copy them to /etc/systemd/system, then: systemctl daemon-reload && systemctl enable --now "
                f"{app}.target")
    elif format_name == "supervisord":
        bad = [name for name, value in env.items() if '"' in value]
        if bad:
            fail(f"{bad[0]} contains a double quote, which a supervisord environment line cannot hold", CONFIG_ERROR)
        files = exporter.supervisord(app, processes, settings.project_dir,
                                     {name: value.replace("%", "%%") for name, value in env.items()})
        private = {f"{app}.conf"}
        hint = f"include it from supervisord.conf ([include] files = {folder.resolve()}/*.conf), then: " \
               f"supervisorctl update && supervisorctl start {app}:*"
    else:
        files = exporter.compose(app, processes, env_name)
        files[env_name] = exporter.environment_file(env)
        private = {env_name}
        hint = f"build an image with your project and dify-local as {app} (or set DIFY_LOCAL_IMAGE), then: " \
               f"docker compose -f {folder / 'compose.yaml'} up -d"
    try:
        written = exporter.write(folder, files, private)
    except UnicodeEncodeError:  # a path or value from bytes that are not UTF-8, in files that must be
        fail(f"cannot write the {format_name} files to {folder}: a path or setting in them is not UTF-8 text; "
             "use UTF-8 names", CONFIG_ERROR)
    except OSError as error:
        at = f" at {error.filename}" if error.filename and Path(error.filename) != folder else ""
        fail(f"cannot write the {format_name} files to {folder} ({error.strerror or error}{at}): name a folder this "
             "user can write", CONFIG_ERROR)
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(f"{len(processes)} process type(s) from {source}; {hint}")
    if warning:
        click.echo(f"warning: {warning}", err=True)
