"""What a process of the stack holds besides Celery: settings, state paths, the metadata store."""

from __future__ import annotations

import threading

from runner.settings import Settings
from runner.state import StatePaths
from runner.store.database import Database, PoolLimits


class AppContext:
    """Per-process resources; tasks reach it as `self.app.dify`."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.paths = StatePaths(settings.state_dir)
        self._lock = threading.Lock()
        self._database: Database | None = None

    @property
    def database(self) -> Database:
        """The metadata store's pool, opened on first use (pool threads may race to it)."""
        if self._database is None:
            with self._lock:
                if self._database is None:
                    self._database = Database(self.paths.database, PoolLimits.from_settings(self.settings))
        return self._database
