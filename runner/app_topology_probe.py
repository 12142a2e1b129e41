"""Print a Celery app's topology as JSON: `python app_topology_probe.py MODULE.ATTR`.

Run by the *project's* interpreter (`uv run python …`, `.venv/bin/python …`), in the project's
folder, since the app's libraries live in its environment, not in dify-local's. So this file
imports nothing of dify-local and only the standard library before the app: it must stay
standalone.

The app is imported as `celery -A` does (the folder first on sys.path), its task modules as a
worker imports them (`imports`, `include`), and each task's queue is asked of Celery's own router
(task options, `task_routes`, the default queue). Whatever the app prints while importing goes to
stderr; stdout carries one JSON document. Exit status 3 when the import fails, with the error in
the JSON and the traceback on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import timedelta

IMPORT_FAILED = 3


def load_app(name: str):
    """The app as `celery -A NAME` finds it (Celery's own find_app: a module, `module.attr` or `module:attr`)."""
    from celery import Celery
    from celery.app.utils import find_app

    app = find_app(name)
    if not isinstance(app, Celery):  # `-A app` in Dify finds its Flask app, as Celery's CLI would
        raise TypeError(f"{name} is a {type(app).__name__}, not a Celery app (name one: -A module.attribute)")
    return app


def describe_schedule(schedule) -> str:
    if isinstance(schedule, timedelta):
        seconds = schedule.total_seconds()
    elif isinstance(schedule, (int, float)):
        seconds = float(schedule)
    elif hasattr(schedule, "_orig_minute"):  # crontab
        fields = ("_orig_minute", "_orig_hour", "_orig_day_of_month", "_orig_month_of_year", "_orig_day_of_week")
        return "crontab " + " ".join(str(getattr(schedule, field)) for field in fields)
    elif hasattr(schedule, "run_every"):
        seconds = schedule.run_every.total_seconds()
    else:
        return str(schedule)[:200]
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"every {seconds / size:g} {unit}"
    return f"every {seconds:g} s"


def queue_of(app, name: str, options: dict) -> str | None:
    route = app.amqp.router.route(dict(options), name, (), {})
    queue = route.get("queue")
    return getattr(queue, "name", queue)


def topology(app) -> dict:
    app.loader.import_default_modules()  # `imports` and `include`, as a worker does at start
    app.finalize(auto=True)
    tasks, errors = [], []
    for name in sorted(app.tasks):
        if name.startswith("celery."):
            continue
        task = app.tasks[name]
        try:
            queue = queue_of(app, name, task._get_exec_options())
        except Exception as error:  # a route to a queue the app refuses to create, a broken router
            errors.append(f"task {name}: {type(error).__name__}: {error}")
            queue = None
        tasks.append({"name": name, "queue": queue, "module": getattr(task, "__module__", None)})
    schedule = []
    for entry_name, entry in sorted((app.conf.beat_schedule or {}).items()):
        task_name = entry.get("task", "")
        task = app.tasks.get(task_name)
        options = dict(task._get_exec_options()) if task is not None else {}
        options.update(entry.get("options") or {})
        try:
            queue = queue_of(app, task_name, options)
        except Exception as error:
            errors.append(f"schedule {entry_name}: {type(error).__name__}: {error}")
            queue = None
        schedule.append({"name": entry_name, "task": task_name, "schedule": describe_schedule(entry.get("schedule")),
                         "queue": queue, "registered": task is not None})
    declared = [queue.name for queue in (app.conf.task_queues or ())]
    return {"main": app.main, "default_queue": app.conf.task_default_queue, "declared_queues": declared,
            "tasks": tasks, "schedule": schedule, "errors": errors}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: app_topology_probe.py MODULE.ATTR", file=sys.stderr)
        return 2
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # the app's own prints and logs, even from C, go to stderr
    sys.stdout = sys.stderr
    # as `celery -A` finds the project's modules; not this file's folder, runner/, whose app.py,
    # celery_app.py … would shadow the project's own
    here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [os.getcwd(), *(path for path in sys.path if os.path.realpath(path or ".") != here)]
    started = time.monotonic()
    try:
        app = load_app(argv[1])
        result = topology(app)
    except BaseException as error:  # SystemExit from a settings check, too
        traceback.print_exc()
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        out.write(json.dumps({"error": last}) + "\n")
        out.flush()
        return IMPORT_FAILED
    result["app"] = argv[1]
    result["import_seconds"] = round(time.monotonic() - started, 3)
    out.write(json.dumps(result) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
