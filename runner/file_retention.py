"""Removing old files from the state folder for the retention tasks: nothing outside the folder
given, never a symbolic link's target, and never a file in use (only the ones older than a cutoff)."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from runner import safe_files

ROTATED_LOG = re.compile(r"^.+\.log\.\d+$")  # NAME.log.1 … as logging's RotatingFileHandler names them


def remove_older_than(state_root: Path, folder: Path, cutoff: float, name_pattern: re.Pattern | None = None) -> dict:
    """Remove the files under `folder` (a folder of the state folder) last modified before `cutoff`
    (a UNIX time), then the folders that leaves empty; returns how many files and bytes went.

    The walk is by descriptors (os.fwalk from the folder opened without following a link): a link
    at the folder, or at a folder inside it, is never walked into."""
    files = size = 0
    try:
        with safe_files.folder(state_root, folder, create=False) as top:
            for _path, _dirs, names, fd in os.fwalk(".", topdown=False, dir_fd=top):
                for name in names:
                    if name_pattern is not None and not name_pattern.match(name):
                        continue
                    try:
                        info = os.lstat(name, dir_fd=fd)
                        if (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)) and info.st_mtime < cutoff:
                            os.unlink(name, dir_fd=fd)
                            files += 1
                            size += info.st_size if stat.S_ISREG(info.st_mode) else 0
                    except FileNotFoundError:  # removed meanwhile
                        continue
                for name in _dirs:
                    try:
                        os.rmdir(name, dir_fd=fd)  # only when empty
                    except OSError:
                        pass
    except FileNotFoundError:
        pass
    return {"files": files, "bytes": size}
