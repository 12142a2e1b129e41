"""Another project's Celery worker or beat (or `flask run`) under `up`'s hot reload, in that project's own
interpreter: `up` runs `<their python> bootstrap.py celery -A app worker …` for a Procfile line
`celery -A app worker …` (runner/reload/foreign.py rewrites it).

Standalone on purpose: the project's virtualenv has Celery but not dify-local, so this file imports
only the standard library (and, once running, the project's own Celery or Flask). It speaks the
channel our roles speak (runner/reload/child.py, JSON lines on an inherited socket):

    spare    import the libraries the last process of this line imported  → "standby"  ← "load"
    load     the app (-A), then its task modules (Celery's own loader)    → "loaded" (or "failed", file and line)
             ← "serve" when taking over: the old worker is stopping warmly
    serve    Celery's own CLI (celery.bin.celery.main)                    → "serving" at worker_ready / beat_init
    always   the files imported under the watched folders                 → "imports"

Beat runs no task code (it sends by name, with the app's routes): the task modules Celery's loader
imports into beat are left out of its report, so a save of one reloads the worker only.
"""

import importlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback

# The names of runner/process_env.py (tests/test_foreign_reload.py checks they agree).
CHANNEL_FD = "DIFY_LOCAL_CHANNEL_FD"
WATCH_ROOTS = "DIFY_LOCAL_WATCH_ROOTS"
STANDBY = "DIFY_LOCAL_STANDBY"
HANDOVER = "DIFY_LOCAL_HANDOVER"
IMPORTS_INTERVAL = 1.0  # seconds between checks for newly imported modules
PROGRAMS = ("celery", "flask")


class Link:
    """Our end of the channel; every call is a no-op without one (run by hand)."""

    def __init__(self):
        self.sock = None
        self.lock = threading.Lock()
        fd = os.environ.pop(CHANNEL_FD, "")  # popped: processes this one starts must not find it
        if fd.isdigit():
            try:
                self.sock = socket.socket(fileno=int(fd))
                self.sock.set_inheritable(False)
                self.reader = self.sock.makefile("rb")
            except OSError:
                self.sock = None

    def send(self, event, **data):
        if self.sock is None:
            return False
        line = json.dumps(dict(data, event=event), separators=(",", ":")).encode() + b"\n"
        try:
            with self.lock:
                self.sock.sendall(line)
            return True
        except OSError:
            return False

    def wait_for(self, event):
        """The next message of this kind; None once `up` has closed its end."""
        if self.sock is None:
            return None
        while True:
            try:
                line = self.reader.readline()
            except (OSError, ValueError):
                return None
            if not line:
                return None
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("event") == event:
                return message


def roots():
    return tuple(os.path.join(os.path.realpath(root), "") for root in
                 os.environ.get(WATCH_ROOTS, "").split(os.pathsep) if root)


_real_paths = {}  # a module's file → its real path: thousands of realpath calls (a lstat per folder) per report


def real_path(path):
    real = _real_paths.get(path)
    if real is None:
        real = _real_paths[path] = os.path.realpath(path)
    return real


def imported(left_out=frozenset()):
    """(files under the watched folders, names of modules from anywhere else)."""
    watched = roots()
    files, others = [], []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        real = real_path(path) if isinstance(path, str) else ""
        if real and watched and real.startswith(watched):
            if real not in left_out:
                files.append(real)
        elif not name.startswith("__"):
            others.append(name)
    return sorted(files), others


def describe_failure(error):
    """Where a load failed: the file and line to fix (the innermost frame under the watched folders)."""
    if isinstance(error, SyntaxError) and error.filename:
        return {"file": error.filename, "line": error.lineno, "error": f"{type(error).__name__}: {error.msg}"}
    frames = traceback.extract_tb(error.__traceback__)
    watched = roots()
    ours = [frame for frame in frames if watched and os.path.realpath(frame.filename).startswith(watched)]
    frame = (ours or frames or [None])[-1]
    text = f"{type(error).__name__}: {error}"
    if frame is None:
        return {"file": None, "line": None, "error": text}
    return {"file": frame.filename, "line": frame.lineno, "error": text}


def report_imports_forever(link, left_out, count=-1):
    """`count`: modules already reported (by "loaded"): the first report waits, off the worker's start."""
    while True:
        if len(sys.modules) != count:
            count = len(sys.modules)
            files, others = imported(left_out)
            if not link.send("imports", files=files, modules=others):
                return
        time.sleep(IMPORTS_INTERVAL)


def stand_by(link):
    """As a spare: import the libraries the last process imported, then wait to be told to load."""
    preload = link.wait_for("preload")
    if preload is None:
        sys.exit(0)
    for name in preload.get("modules", []):
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: B036 - one that fails here fails again, visibly, when loading
            pass
    files, _ = imported()
    link.send("standby", files=files)
    if link.wait_for("load") is None:  # `up` stopped before this spare was needed
        sys.exit(0)


def option(args, short, long):
    """The value of -A X / -AX / --app X / --app=X among Celery's arguments."""
    for index, item in enumerate(args):
        if item in (short, long) and index + 1 < len(args):
            return args[index + 1]
        if item.startswith(long + "="):
            return item.split("=", 1)[1]
        if short and item.startswith(short) and len(item) > len(short) and not item.startswith("--"):
            return item[len(short):]
    return None


def load_celery(args):
    """The app and its task modules, imported the way Celery's CLI and loader import them, before the
    worker starts: a broken task module is reported here, with the old worker still serving.
    Returns the task modules' files (beat leaves them out of its report)."""
    workdir = option(args, "", "--workdir")
    if workdir:
        os.chdir(workdir)
    name = option(args, "-A", "--app") or os.environ.get("CELERY_APP")
    if not name:
        return frozenset()
    from celery.app.utils import find_app

    app = find_app(name)
    before = set(imported()[0])
    app.loader.import_default_modules()
    return frozenset(imported()[0]) - before


class PromptShutdown:
    """Celery acts on a warm shutdown at its event loop's next turn, up to a second after the signal,
    and meanwhile may still start a task, which would run the old code beside a successor that
    consumes already. Python's wakeup fd is put in the loop, so the poll returns at once."""

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def attach(self, sender=None, **_):
        hub = getattr(sender, "hub", None)  # the consumer's event loop (none with the solo pool)
        if hub is None or threading.current_thread() is not threading.main_thread():
            return
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        hub.add_reader(self.read_fd, self.drain)

    def drain(self, *_):
        try:
            while os.read(self.read_fd, 512):
                pass
        except BlockingIOError:
            pass


def quiet_requeues(**_):
    """A stopping worker hands back the message its last BRPOP took; kombu warns about each, which
    on a reload reads like trouble when it is the designed path."""
    import logging

    logging.getLogger("kombu.transport.virtual.base").setLevel(logging.ERROR)


def run_celery(link, args):
    from celery import signals

    role = next((item for item in args if item in ("worker", "beat")), None)
    try:
        task_files = load_celery(args)
    except BaseException as error:  # noqa: B036 - SystemExit from an app's import is a failure to load too
        link.send("failed", code=True, user_must_fix=False, **describe_failure(error))
        traceback.print_exc()
        sys.exit(1)
    left_out = task_files if role == "beat" else frozenset()
    files, others = imported(left_out)
    reported = len(sys.modules)
    link.send("loaded", files=files, modules=others)
    if os.environ.get(HANDOVER) == "1" and link.sock is not None:
        if link.wait_for("serve") is None:
            sys.exit(0)
        args = ["--quiet", *args]  # the banner was shown when the stack started; a reload says so in one line
    threading.Thread(target=report_imports_forever, args=(link, left_out, reported), name="report-imports",
                     daemon=True).start()

    def serving(**_):
        link.send("serving")

    if role == "worker":
        prompt = PromptShutdown()
        signals.worker_ready.connect(prompt.attach, weak=False)
        signals.worker_ready.connect(serving, weak=False)
        signals.worker_shutting_down.connect(quiet_requeues, weak=False)
    else:
        signals.beat_init.connect(serving, weak=False)
    from celery.bin.celery import main as celery_main

    sys.argv = ["celery", *args]
    sys.exit(celery_main())


def run_flask(link, args):
    """Flask loads the app itself; this only reports what it imported (a cold restart when one changes)."""
    threading.Thread(target=report_imports_forever, args=(link, frozenset()), name="report-imports",
                     daemon=True).start()
    from flask.cli import main as flask_main

    sys.argv = ["flask", *args]
    sys.exit(flask_main())


def main(argv):
    here = os.path.dirname(os.path.realpath(__file__))
    if sys.path and os.path.realpath(sys.path[0] or os.curdir) == here:
        sys.path.pop(0)  # this file's folder is no part of the project's import path
    if not argv or argv[0] not in PROGRAMS:
        sys.exit(f"dify-local bootstrap: runs one of {', '.join(PROGRAMS)} (`bootstrap.py celery -A app worker …`)")
    program, args = argv[0], argv[1:]
    link = Link()
    if program == "celery":
        from celery import maybe_patch_concurrency

        maybe_patch_concurrency(["celery", *args])  # gevent/eventlet patch before anything else is imported
    if os.environ.get(STANDBY) == "1" and link.sock is not None:
        stand_by(link)
    if program == "celery":
        run_celery(link, args)
    else:
        run_flask(link, args)


if __name__ == "__main__":
    main(sys.argv[1:])
