"""The topology of a project's own Celery app (tests/dify_shaped): Procfile lines recognised however
Celery is launched, the app imported by its own interpreter, the queue no worker consumes found by
`topology`, warned about by `up`, failed by `doctor`; a worker on a subset of queues accepted."""

from __future__ import annotations

import pytest

from runner.supervisor.procfile import describe

LINES = {
    "celery -A app.celery worker -P threads -c 2 -Q a,b": ("worker", "app.celery", ("a", "b"), ()),
    "uv run celery -A app.celery worker -Q x": ("worker", "app.celery", ("x",), ("uv", "run", "python")),
    "uv --directory api run celery -A app.celery beat --loglevel INFO":
        ("beat", "app.celery", None, ("uv", "--directory", "api", "run", "python")),
    "uv run --with x -n celery --app app.celery worker -n w@%h -Q q":
        ("worker", "app.celery", ("q",), ("uv", "run", "--with", "x", "-n", "python")),
    "poetry run celery --app=app.celery worker": ("worker", "app.celery", None, ("poetry", "run", "python")),
    "pipenv run python -m celery -A app worker": ("worker", "app", None, ("pipenv", "run", "python")),
    ".venv/bin/celery -A app.celery worker -Qdataset": ("worker", "app.celery", ("dataset",), (".venv/bin/python",)),
    "/srv/env/bin/python3.12 -m celery -A app.celery beat": ("beat", "app.celery", None, ("/srv/env/bin/python3.12",)),
    "python3 -m celery -A app.celery worker": ("worker", "app.celery", None, ("python3",)),
    "celery worker -A app.celery": ("worker", "app.celery", None, ()),
    "celery -A beat worker": ("worker", "beat", None, ()),  # the app's name is not the subcommand
    "uv run flask run --port 5001": (None, None, None, ()),
    "python -m flask run": (None, None, None, ()),
    "uv run": (None, None, None, ()),
}


@pytest.mark.parametrize("command", list(LINES))
def test_celery_lines_are_recognised_through_every_launcher(command):
    spec = describe("p", command)
    assert (spec.role, spec.celery_app, spec.queues, spec.python) == LINES[command]


def test_our_own_lines_keep_their_roles():
    spec = describe("worker", "dify-local serve worker -Q dataset,priority_dataset")
    assert (spec.role, spec.queues, spec.celery_app, spec.is_ours) == ("worker", ("dataset", "priority_dataset"),
                                                                       None, True)
