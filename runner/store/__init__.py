"""The metadata store: SQLite through sqlite-utils, in the state folder."""

from __future__ import annotations

import logging

from runner.store.database import Database
from runner.store.migrations import apply_migrations, schema_state

log = logging.getLogger(__name__)


class SchemaOutOfDate(Exception):
    """The database lacks migrations this code needs, and migrating is turned off."""


def prepare_database(database: Database, migrate: bool) -> None:
    """Apply pending migrations, or (MIGRATION_ENABLED=false) refuse to run on an old schema."""
    if migrate:
        applied = apply_migrations(database)
        if applied:
            log.info("database %s migrated: %s", database.path, ", ".join(applied))
        return
    state = schema_state(database)
    if not state.current:
        raise SchemaOutOfDate(
            f"the database {database.path} lacks migration(s) {', '.join(state.pending)} and "
            "MIGRATION_ENABLED=false: run `dify-local migrate`")
