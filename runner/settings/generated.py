"""The embedded broker's password when nobody sets one: random, made once per state folder and
kept in it (`broker-password`, readable by its owner alone).

Dify's own default (difyai123456) is printed in its documentation, and loopback is not private:
every user of the machine can reach the broker's port. A password of the state folder is known
only to its owner, and each project (state folder) has its own.

Made so that two commands starting at once agree on one password and none reads half a file: it
is written in full to a temporary file of our own (O_CREAT|O_EXCL|O_NOFOLLOW, 0600), then linked
to its name, which fails if the name exists (even as a dangling symlink). It is read without
following a symlink, at most MAX_BYTES, and only when it is a file of ours that no one else may
read.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from pathlib import Path

TOKEN_BYTES = 32  # 43 characters of URL-safe base64: nothing to quote in a URL, a shell or a .env line
MAX_BYTES = 256
PASSWORD = re.compile(r"[\x21-\x7e]{16,128}")  # visible ASCII, one line
REMEDY = "delete it, and restart `dify-local up` (a new one is made at the next start)"


class BrokerPasswordError(Exception):
    """One line: the file, what is wrong with it, and what to do."""


class CannotMakeError(BrokerPasswordError):
    """There is none, and the state folder cannot take one (not a folder, not writable)."""


def broker_password(path: Path, make: bool = True) -> str | None:
    """The password kept at `path`; where there is none, made there (`make`), or None."""
    try:
        return _read(path)
    except (FileNotFoundError, NotADirectoryError):
        if not make:
            return None
    _create(path)
    return _read(path)


def _read(path: Path) -> str:
    try:
        # O_NONBLOCK: a FIFO put there must not hang the command
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise
    except OSError as error:
        if os.path.islink(path):
            raise BrokerPasswordError(f"{path} is a symbolic link: the broker password is read from a file of the "
                                      f"state folder only; {REMEDY}") from None
        raise BrokerPasswordError(f"cannot read the broker password {path}: {error.strerror}") from None
    try:
        facts = os.fstat(descriptor)
        if not stat.S_ISREG(facts.st_mode):
            raise BrokerPasswordError(f"{path} is not a file; {REMEDY}")
        if facts.st_uid != os.geteuid():
            raise BrokerPasswordError(f"{path} belongs to another user (uid {facts.st_uid}), who knows the broker "
                                      f"password in it; {REMEDY}")
        if facts.st_mode & 0o077:
            raise BrokerPasswordError(f"{path} may be read or changed by other users (mode "
                                      f"{stat.S_IMODE(facts.st_mode):04o}), so its password may be known; {REMEDY}")
        data = os.read(descriptor, MAX_BYTES + 1)
    except OSError as error:
        raise BrokerPasswordError(f"cannot read the broker password {path}: {error.strerror}") from None
    finally:
        os.close(descriptor)
    text = data.decode("ascii", "replace").removesuffix("\n")
    if len(data) > MAX_BYTES or not PASSWORD.fullmatch(text):
        raise BrokerPasswordError(f"{path} does not hold a broker password (16 to 128 visible ASCII characters on "
                                  f"one line); {REMEDY}")
    return text


def _create(path: Path) -> None:
    partial = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except (FileExistsError, NotADirectoryError):
        raise CannotMakeError(f"the state folder {path.parent} is not a folder, so the broker password cannot be "
                              "kept in it; set DIFY_LOCAL_STATE_DIR (or --state-dir) to a folder") from None
    except OSError as error:
        raise CannotMakeError(f"cannot make the state folder {path.parent}: {error.strerror}") from None
    try:
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(descriptor, 0o600)  # whatever the umask
            data = (secrets.token_urlsafe(TOKEN_BYTES) + "\n").encode()
            while data:
                data = data[os.write(descriptor, data):]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        with contextlib.suppress(FileExistsError):  # another command made it first: its password stands
            os.link(partial, path, follow_symlinks=False)
    except OSError as error:
        raise CannotMakeError(f"cannot make the broker password {path}: {error.strerror or error}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(partial)
