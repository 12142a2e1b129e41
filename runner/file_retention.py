"""Removing old files from the state folder for the retention tasks: nothing outside the folder
given, never a symbolic link's target, and never a file in use (only the ones older than a cutoff)."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

ROTATED_LOG = re.compile(r"^.+\.log\.\d+$")  # NAME.log.1 … as logging's RotatingFileHandler names them


def remove_older_than(folder: Path, cutoff: float, name_pattern: re.Pattern | None = None) -> dict:
    """Remove the files under `folder` last modified before `cutoff` (a UNIX time), then the
    folders that leaves empty; returns how many files and bytes went."""
    files = size = 0
    if not folder.is_dir():
        return {"files": 0, "bytes": 0}
    for root, _dirs, names in os.walk(folder, topdown=False, followlinks=False):
        for name in names:
            if name_pattern is not None and not name_pattern.match(name):
                continue
            path = Path(root) / name
            try:
                info = path.lstat()
                if (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)) and info.st_mtime < cutoff:
                    path.unlink()
                    files += 1
                    size += info.st_size if stat.S_ISREG(info.st_mode) else 0
            except FileNotFoundError:  # removed meanwhile
                continue
        if Path(root) != folder:
            try:
                Path(root).rmdir()  # only when empty
            except OSError:
                pass
    return {"files": files, "bytes": size}
