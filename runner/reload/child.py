"""A supervised process's side of hot reload: every call is a no-op outside `up --reload`.

A role's life, as `up` sees it over the channel:

    [standby]  libraries imported, waiting          → "standby"  ← "load"
    loading    settings, app, task modules, database → "loaded"   ← "serve" (when taking over)
    serving    consuming / listening / ticking      → "serving"
    any time   the files imported under the watched folders → "imports"

A failure while loading (a syntax error in a task module, a missing import) is reported as
"failed" with the file and line, so `up` can keep the previous process serving.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
import traceback
from typing import Any

from runner.process_env import CHANNEL_FD, HANDOVER, STANDBY, WATCH_ROOTS
from runner.reload.channel import Channel

IMPORTS_INTERVAL = 1.0  # seconds between checks for newly imported modules

_channel: Channel | None = None
_opened = False
_loaded = False


def channel() -> Channel | None:
    global _channel, _opened
    if not _opened:
        _opened = True
        fd = os.environ.pop(CHANNEL_FD, "")  # popped: processes this one starts must not find it
        if fd.isdigit():
            try:
                import socket
                sock = socket.socket(fileno=int(fd))
                sock.set_inheritable(False)
                _channel = Channel(sock)
            except OSError:
                _channel = None
    return _channel


def _roots() -> tuple[str, ...]:
    return tuple(os.path.join(os.path.realpath(root), "") for root in
                 os.environ.get(WATCH_ROOTS, "").split(os.pathsep) if root)


def imported() -> tuple[list[str], list[str]]:
    """(files under the watched folders, names of modules from anywhere else)."""
    roots = _roots()
    files, others = [], []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        real = os.path.realpath(path) if isinstance(path, str) else ""
        if real and real.startswith(roots):
            files.append(real)
        elif not name.startswith("__"):
            others.append(name)
    return sorted(files), others


def _report_imports_forever(link: Channel) -> None:
    count = -1
    while True:
        if len(sys.modules) != count:
            count = len(sys.modules)
            files, others = imported()
            if not link.send("imports", files=files, modules=others):
                return
        time.sleep(IMPORTS_INTERVAL)


def stand_by() -> None:
    """As a standby: import what the last process of this kind had imported from outside the
    watched folders (the libraries: most of its start-up time), then wait for "load"."""
    link = channel()
    if link is None or os.environ.get(STANDBY) != "1":
        return
    preload = link.wait_for("preload")
    if preload is None:
        sys.exit(0)
    for name in preload.get("modules", []):
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: B036 - a library that fails here fails again, visibly, when loading
            pass
    files, _ = imported()
    link.send("standby", files=files)
    if link.wait_for("load") is None:  # `up` stopped before this spare was needed
        sys.exit(0)


def taking_over() -> bool:
    """Started by `up` to replace a running process (its banner was shown once already)."""
    return os.environ.get(HANDOVER) == "1"


def loaded() -> None:
    """Everything is imported and prepared; next is serving. A process taking over waits here for
    the one it replaces to let go (a port, beat's schedule)."""
    global _loaded
    _loaded = True
    link = channel()
    if link is None:
        return
    files, others = imported()
    link.send("loaded", files=files, modules=others)
    if taking_over() and link.wait_for("serve") is None:
        sys.exit(0)
    threading.Thread(target=_report_imports_forever, args=(link,), name="report-imports", daemon=True).start()


def serving() -> None:
    link = channel()
    if link is not None:
        link.send("serving")


def describe_failure(error: BaseException) -> dict[str, Any]:
    """Where a load failed: the file and line to fix, and what went wrong."""
    if isinstance(error, SyntaxError) and error.filename:
        return {"file": error.filename, "line": error.lineno, "error": f"{type(error).__name__}: {error.msg}"}
    frames = traceback.extract_tb(error.__traceback__)
    roots = _roots()
    ours = [frame for frame in frames if os.path.realpath(frame.filename).startswith(roots)] if roots else []
    frame = (ours or frames or [None])[-1]
    text = f"{type(error).__name__}: {error}"
    if frame is None:
        return {"file": None, "line": None, "error": text}
    return {"file": frame.filename, "line": frame.lineno, "error": text}


def failed(error: BaseException, code: bool = True, user_must_fix: bool = False) -> None:
    """Report a failure before "loaded"; `code` False for one no edit fixes (the broker is down),
    `user_must_fix` for one no restart fixes either (a corrupt database: `up` stops trying)."""
    link = channel()
    if link is not None and not _loaded:
        link.send("failed", code=code, user_must_fix=user_must_fix, **describe_failure(error))
