"""Build the dify-local binary: `./dev build` (or `.venv/bin/python build/build.py`).

Writes dist/dify-local (one file) and dist/dify-local-dir/ (one folder, starts faster), checks
that each runs, and prints their sizes. PyInstaller's work files go to build/out/.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIST = REPO / "dist"
ONE_FILE = DIST / "dify-local"
ONE_FOLDER = DIST / "dify-local-dir" / "dify-local"


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file() and not item.is_symlink())


def main() -> int:
    if shutil.which("pyinstaller", path=str(Path(sys.executable).parent)) is None:
        print("build: PyInstaller is not installed in this environment; `./dev build` installs it", file=sys.stderr)
        return 1
    started = time.monotonic()
    print("build: running PyInstaller on build/dify-local.spec (about a minute) …", flush=True)
    command = [str(Path(sys.executable).parent / "pyinstaller"), "--noconfirm", "--clean", "--log-level", "ERROR",
               "--distpath", str(DIST), "--workpath", str(REPO / "build" / "out"),
               str(REPO / "build" / "dify-local.spec")]
    if subprocess.run(command, cwd=REPO).returncode != 0:
        print("build: PyInstaller failed (its messages are above)", file=sys.stderr)
        return 1
    for binary in (ONE_FILE, ONE_FOLDER):
        check = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
        if check.returncode != 0:
            print(f"build: {binary} does not run: {check.stderr.strip() or check.stdout.strip()}", file=sys.stderr)
            return 1
    print(f"build: {check.stdout.strip()} in {time.monotonic() - started:.0f} s")
    print(f"  {ONE_FILE.relative_to(REPO)}  one file, {size_of(ONE_FILE) / 1e6:.1f} MB")
    print(f"  {ONE_FOLDER.relative_to(REPO)}  one folder, {size_of(ONE_FOLDER.parent) / 1e6:.1f} MB in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
