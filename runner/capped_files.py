"""Reading a file whose size we do not control, at most `cap` bytes of it.

`path.read_text()` reads until the end, and some files have none: `-e /dev/zero` ran until the
OOM killer. A regular file over the cap is refused from its size alone; anything else (a pipe, a
device, a file growing meanwhile) is read up to one byte past the cap.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO


class FileTooLarge(ValueError):
    """The file is over its cap; the message names it, the cap, and what it was read as."""


def shown_size(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def read_capped(path: Path, cap: int, what: str) -> bytes:
    """The file's bytes; FileTooLarge when it holds more than `cap` (OSError as open() raises it)."""
    with open(path, "rb") as handle:
        return read_handle_capped(handle, path, cap, what)


def read_handle_capped(handle: BinaryIO, path: Path, cap: int, what: str) -> bytes:
    """The rest of an open file, as read_capped reads it (`path` names it in the error)."""
    status = os.fstat(handle.fileno())
    if stat.S_ISREG(status.st_mode) and status.st_size > cap:
        raise FileTooLarge(f"{path} is {status.st_size} bytes; {what} may have at most {shown_size(cap)}")
    data = handle.read(cap + 1)
    if len(data) > cap:
        raise FileTooLarge(f"{path} holds more than {shown_size(cap)}; {what} may have at most that")
    return data


def read_text_capped(path: Path, cap: int, what: str) -> str:
    """As read_capped, decoded as UTF-8 (UnicodeDecodeError as bytes.decode raises it)."""
    return read_capped(path, cap, what).decode("utf-8")
