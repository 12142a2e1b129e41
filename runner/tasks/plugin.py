"""Plugins (queue plugin): which installed plugins have a newer version in the local index."""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

from runner.tasks.base import context, now, task


def _newer(latest: str, installed: str) -> bool:
    try:
        return Version(latest) > Version(installed)
    except InvalidVersion:
        return latest != installed


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
            if row["latest"] and _newer(row["latest"], row["version"]):
                upgradable.append({"name": row["name"], "installed": row["version"], "latest": row["latest"]})
    return {"checked": len(rows), "upgradable": upgradable}
