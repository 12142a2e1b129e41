"""What `up` reads from another project's command lines: where a web server listens, where beat
keeps its schedule, and whether our API joins the Procfile (no process is started here)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from runner.supervisor.api_place import with_our_api
from runner.supervisor.foreign_readiness import Address, beat_schedule, web_address
from runner.supervisor.procfile import describe

ENV = {"PORT": "5100"}


@pytest.mark.parametrize("command, address", [
    ("flask run", Address("127.0.0.1", 5000)),  # flask's own default
    ("uv run flask run --host 0.0.0.0 --port=5001 --debug", Address("127.0.0.1", 5001)),  # Dify's dev/start-api
    ("flask --app web run --port $PORT", Address("127.0.0.1", 5100)),
    ("python -m flask run -p 5555", Address("127.0.0.1", 5555)),
    (".venv/bin/gunicorn -b 0.0.0.0:9000 app:app", Address("127.0.0.1", 9000)),
    ("gunicorn app:app", Address("127.0.0.1", 5100)),  # gunicorn binds $PORT when given no --bind
    ("poetry run uvicorn app:app --port 7000", Address("127.0.0.1", 7000)),
    ("hypercorn app:app", Address("127.0.0.1", 8000)),
    ("waitress-serve --listen=*:8081 app:app", Address("127.0.0.1", 8081)),
    ("python manage.py runserver [::]:8001", Address("::1", 8001)),
    ("node server.js --port ${PORT}", Address("127.0.0.1", 5100)),
])
def test_where_a_web_process_listens(command, address):
    assert web_address(tuple(shlex.split(command)), ENV) == address


@pytest.mark.parametrize("command", [
    "celery -A app.celery worker -P threads -c 2", "python web.py", "gunicorn -b unix:/tmp/app.sock app:app",
    "uvicorn app:app --uds /tmp/app.sock", "sleep 600",
])
def test_what_is_not_a_web_process_we_can_probe(command):
    assert web_address(tuple(shlex.split(command)), ENV) is None


def test_flask_reads_its_port_from_the_environment_too():
    assert web_address(("flask", "run"), {"FLASK_RUN_PORT": "5001", "FLASK_RUN_HOST": "0.0.0.0"}) == \
        Address("127.0.0.1", 5001)


def test_where_beat_keeps_its_schedule():
    default = beat_schedule(tuple(shlex.split("uv run celery -A app.celery beat")), "/p", {})
    assert default.files[0] == Path("/p/celerybeat-schedule") and Path("/p/celerybeat-schedule.db") in default.files
    named = beat_schedule(tuple(shlex.split("celery --workdir api -A app beat -s state/beat")), "/p", {})
    assert named.files[0] == Path("/p/api/state/beat")
    assert beat_schedule(tuple(shlex.split("celery -A app beat -S redbeat.RedBeatScheduler")), "/p", {}).files == ()
    explicit = beat_schedule(tuple(shlex.split("celery -A app beat -S celery.beat:PersistentScheduler")), "/p", {})
    assert explicit.files[0] == Path("/p/celerybeat-schedule")


def test_our_api_joins_a_procfile_of_another_project_only():
    theirs = [describe("api", "uv run flask run --port 5001"), describe("worker", "celery -A app worker")]
    specs, added = with_our_api(theirs, names_given=False)
    assert added is not None and added.name == "dashboard" and added.role == "api" and specs[-1] is added
    assert with_our_api(theirs, names_given=True) == (theirs, None)  # `up api worker`: those only
    ours = [describe("api", "dify-local serve api"), describe("web", "flask run")]
    assert with_our_api(ours, names_given=False) == (ours, None)
    named = [describe("dashboard", "npm run dashboard")]
    assert with_our_api(named, names_given=False)[1].name == "dify-local-api"


def test_a_celery_workers_node_name_as_celery_reads_it():
    import socket

    host = socket.gethostname()
    assert describe("worker", "celery -A app worker").node_name() == f"celery@{host}"
    assert describe("worker", "celery -A app worker -n w1@%h").node_name() == f"w1@{host}"
    assert describe("worker", "celery -A app worker -n box1").node_name() == "celery@box1"  # no @: a host
    assert describe("worker", "celery -A app worker -n w@%n.%d").node_name() == \
        f"w@{host.partition('.')[0]}.{host.partition('.')[2]}"


def test_our_moved_api_takes_the_next_free_port_the_project_names_not():
    import socket

    from runner.supervisor.api_place import free_port
    from runner.supervisor.preflight import port_in_use

    with socket.create_server(("127.0.0.1", 0)) as held:
        asked = held.getsockname()[1]
        if asked + 3 >= 65536:
            pytest.skip("no room above this port")
        theirs = [describe("web", f"flask run --port {asked + 1}")]
        chosen = free_port("127.0.0.1", asked, theirs, {})
        assert chosen not in (asked, asked + 1)  # not the one held, not theirs
        assert chosen == asked + 2 or port_in_use("127.0.0.1", asked + 2)  # the next one, so it stays put
