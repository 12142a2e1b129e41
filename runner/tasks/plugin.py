"""Plugins (queue plugin): installing uploaded packages, and which installed plugins have a newer
version in the local index."""

from __future__ import annotations

import json
import re

from runner import plugins, safe_files
from runner.tasks.base import context, new_id, now, task

PACKAGE_FILE = re.compile(r"^[0-9a-f-]{36}\.zip$")


@task("install_plugin_task")
def install_plugin_task(self, package_file: str) -> dict:
    """Check and unpack an uploaded plugin package, replacing any installed version of it."""
    if not PACKAGE_FILE.match(package_file):
        raise ValueError(f"package_file {package_file!r} must be the <uuid>.zip name the upload returned")
    ctx = context(self)
    settings, paths = ctx.settings, ctx.paths
    source = paths.plugin_packages / package_file
    try:
        data = safe_files.read_bytes(paths.root, source, settings.PLUGIN_MAX_PACKAGE_SIZE,
                                     "a plugin package (PLUGIN_MAX_PACKAGE_SIZE)")
    except FileNotFoundError:
        raise LookupError(f"no uploaded package {package_file!r}") from None
    package = plugins.inspect_package(data, settings.PLUGIN_MAX_PACKAGE_SIZE,
                                      settings.DIFY_LOCAL_PLUGIN_MAX_UNPACKED_SIZE)
    installed_root = paths.plugins
    staging = installed_root / f".{package.name}.{new_id()}"
    relative = paths.plugins.joinpath(package.name).relative_to(paths.files).as_posix()
    with plugins.folder_lock(paths.root, installed_root):
        try:
            size = plugins.unpack(data, paths.root, staging, settings.DIFY_LOCAL_PLUGIN_MAX_UNPACKED_SIZE)
            final = installed_root / package.name
            previous = installed_root / f".{package.name}.old.{new_id()}"
            if safe_files.exists(paths.root, final):
                safe_files.replace(paths.root, final, previous)
            safe_files.replace(paths.root, staging, final)
            safe_files.remove_tree(paths.root, previous)
        except BaseException:
            safe_files.remove_tree(paths.root, staging)
            raise
        _record(ctx, package, len(data), relative)
    safe_files.remove(paths.root, source)
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
    with plugins.folder_lock(ctx.paths.root, ctx.paths.plugins):
        with ctx.database.transaction() as db:
            removed = db.execute("DELETE FROM plugins WHERE name = ?", [name]).rowcount
        safe_files.remove_tree(ctx.paths.root, ctx.paths.plugins / name)
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
