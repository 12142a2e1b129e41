"""Where everything lives inside the state folder: the one place for these paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def database(self) -> Path:
        return self.root / "metadata.db"

    @property
    def files(self) -> Path:
        """The local file store (uploads, run logs, outbox)."""
        return self.root / "files"

    @property
    def outbox(self) -> Path:
        return self.files / "outbox"

    @property
    def temp(self) -> Path:
        """Scratch files; retention removes those older than DIFY_LOCAL_TEMP_FILE_HOURS."""
        return self.files / "tmp"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def beat_schedule(self) -> Path:
        return self.root / "beat-schedule"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def broker_password(self) -> Path:
        """The embedded broker's password when the user sets none (runner.settings.generated)."""
        return self.root / "broker-password"

    def ensure(self) -> "StatePaths":
        """Create the folder tree, readable by its owner only."""
        for folder in (self.root, self.files, self.logs):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self
