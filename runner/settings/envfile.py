"""Reading `.env`-style files: `NAME=value` lines, `#` comments, optional `export` and quotes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from runner.capped_files import FileTooLarge, read_text_capped

LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")
# An env file is a few kilobytes of NAME=value lines (Dify's .env.example: 60 KB); -e /dev/zero
# must not read until memory runs out. For `.env`, `-e FILE` and local_config/*.env alike.
MAX_ENV_FILE = 1024 * 1024


class EnvFileError(ValueError):
    """A line that is neither blank, a comment, nor NAME=value."""


@dataclass(frozen=True)
class Assignment:
    name: str
    value: str
    path: Path
    line: int


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        inner = value[1:-1]
        if value[0] == '"':
            inner = inner.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        return inner
    # An unquoted value may carry a trailing comment, as in Dify's .env.example.
    return re.sub(r"\s+#.*$", "", value)


def read_env_text(path: Path) -> str:
    """The file's text, at most MAX_ENV_FILE bytes of UTF-8 (EnvFileError otherwise; OSError as
    open() raises it, FileNotFoundError included)."""
    try:
        return read_text_capped(path, MAX_ENV_FILE, "an env file (NAME=value lines)")
    except FileTooLarge as error:
        raise EnvFileError(str(error)) from None
    except UnicodeDecodeError:
        raise EnvFileError(f"{path}: not UTF-8 text") from None


def read_env_file(path: Path) -> list[Assignment]:
    text = read_env_text(path)
    assignments = []
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = LINE.match(raw)
        if not match:
            raise EnvFileError(f"{path}:{number}: expected NAME=value, found {stripped[:60]!r}")
        assignments.append(Assignment(match.group(1), _unquote(match.group(2)), path, number))
    return assignments
