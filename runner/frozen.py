"""Running as the PyInstaller binary: how its processes re-invoke it, and what other programs must
not inherit from it.

Every role is the binary started again (`dify-local serve api`). A one-file binary unpacks itself
into a temporary folder at each start; a child started with the bootloader's variables
(`_PYI_*`) uses its parent's folder instead of unpacking another, which is both faster and what
lets the folder be removed when `up` exits. Those variables, and the bootloader's
LD_LIBRARY_PATH (our bundled libraries first), are wrong for any other program: a Procfile line
of another project, or `dify-local job -- COMMAND`, gets the environment the binary was started
with.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from runner import safe_files
from runner.state import StatePaths

PROGRAM = "dify-local"  # the name Procfile lines run; PATH resolves it to this installation
BOOTLOADER_PREFIXES = ("_PYI_", "_MEIPASS")


def frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


def program_dir(state_dir: Path) -> str:
    """A folder whose `dify-local` is this installation, to put first on children's PATH: the
    virtualenv's bin, or the binary's folder; for a binary with another name
    (dify-local-linux-x86_64), a link named dify-local to it in the state folder."""
    if not frozen():
        return str(Path(sys.executable).parent)
    binary = Path(sys.executable).resolve()
    if binary.name == PROGRAM:
        return str(binary.parent)
    paths = StatePaths(state_dir)
    folder = paths.program_links
    # the one link of the state folder, ours: made in a folder opened without following one
    with safe_files.folder(paths.root, folder) as fd:
        try:
            current = os.readlink(PROGRAM, dir_fd=fd)
        except OSError:
            current = None
        if current != str(binary):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(PROGRAM, dir_fd=fd)
            os.symlink(binary, PROGRAM, dir_fd=fd)
    return str(folder)


def foreign_environment(env: dict[str, str]) -> dict[str, str]:
    """`env` without what the binary's bootloader added, for a program that is not dify-local."""
    if not frozen():
        return env
    clean = {name: value for name, value in env.items() if not name.startswith(BOOTLOADER_PREFIXES)}
    original = clean.pop("LD_LIBRARY_PATH_ORIG", None)
    if original is not None:
        clean["LD_LIBRARY_PATH"] = original
    else:
        clean.pop("LD_LIBRARY_PATH", None)
    return clean
