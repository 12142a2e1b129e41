"""Plugins (queue plugin): installing uploaded packages, and which installed plugins have a newer
version in the local index."""

from __future__ import annotations

import json
import re

from runner import plugins
from runner.capped_files import read_capped
from runner.tasks.base import context, new_id, now, task

PACKAGE_FOLDER = "plugin-packages"  # uploads waiting for the plugin queue
PLUGIN_FOLDER = "plugins"  # installed plugins, one folder per name
PACKAGE_FILE = re.compile(r"^[0-9a-f-]{36}\.zip$")


@task("install_plugin_task")
def install_plugin_task(self, package_file: str) -> dict:
    """Check and unpack an uploaded plugin package, replacing any installed version of it."""
    if not PACKAGE_FILE.match(package_file):
        raise ValueError(f"package_file {package_file!r} must be the <uuid>.zip name the upload returned")
    ctx = context(self)
    settings = ctx.settings
    source = ctx.paths.files / PACKAGE_FOLDER / package_file
    if not source.exists():
        raise LookupError(f"no uploaded package {package_file!r}")
    data = read_capped(source, settings.PLUGIN_MAX_PACKAGE_SIZE, "a plugin package (PLUGIN_MAX_PACKAGE_SIZE)")
    package = plugins.inspect_package(data, settings.PLUGIN_MAX_PACKAGE_SIZE,
                                      settings.DIFY_LOCAL_PLUGIN_MAX_UNPACKED_SIZE)
    installed_root = ctx.paths.files / PLUGIN_FOLDER
    staging = installed_root / f".{package.name}.{new_id()}"
    relative = f"{PLUGIN_FOLDER}/{package.name}"
    with plugins.folder_lock(installed_root):
        try:
            size = plugins.unpack(data, staging, settings.DIFY_LOCAL_PLUGIN_MAX_UNPACKED_SIZE)
            final = installed_root / package.name
            previous = installed_root / f".{package.name}.old.{new_id()}"
            if final.exists():
                final.rename(previous)
            staging.rename(final)
            plugins.remove_folder(previous, installed_root)
        except BaseException:
            plugins.remove_folder(staging, installed_root)
            raise
        _record(ctx, package, len(data), relative)
    source.unlink(missing_ok=True)
    return {"name": package.name, "version": package.version, "path": relative, "unpacked_bytes": size,
            "entries": package.entries}


def _record(ctx, package: plugins.Package, package_size: int, relative: str) -> None:
    with ctx.database.transaction() as db:
        db.execute("INSERT INTO plugins (name, version, installed_at, manifest, package_size, path) "
                   "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET version = excluded.version, "
                   "installed_at = excluded.installed_at, manifest = excluded.manifest, "
                   "package_size = excluded.package_size, path = excluded.path, latest_version = NULL, "
                   "checked_at = NULL",
                   [package.name, package.version, now(), json.dumps(package.manifest), package_size, relative])


@task("uninstall_plugin_task")
def uninstall_plugin_task(self, name: str) -> dict:
    """Remove an installed plugin: its folder and its row."""
    if not plugins.NAME.match(name):
        raise ValueError(f"{name!r} is not a plugin name")
    ctx = context(self)
    installed_root = ctx.paths.files / PLUGIN_FOLDER
    with plugins.folder_lock(installed_root):
        with ctx.database.transaction() as db:
            removed = db.execute("DELETE FROM plugins WHERE name = ?", [name]).rowcount
        plugins.remove_folder(installed_root / name, installed_root)
    return {"name": name, "removed": bool(removed)}


@task("check_upgradable_plugin_task")
def check_upgradable_plugin_task(self) -> dict:
    """Compare every installed plugin with the local index and record the latest version."""
    with context(self).database.transaction() as db:
        rows = list(db.query("SELECT p.name, p.version, i.version AS latest FROM plugins p "
                             "LEFT JOIN plugin_index i ON i.name = p.name"))
        upgradable = []
        for row in rows:
            db.execute("UPDATE plugins SET latest_version = ?, checked_at = ? WHERE name = ?",
                       [row["latest"], now(), row["name"]])
            if row["latest"] and plugins.is_newer(row["latest"], row["version"]):
                upgradable.append({"name": row["name"], "installed": row["version"], "latest": row["latest"]})
    return {"checked": len(rows), "upgradable": upgradable}
