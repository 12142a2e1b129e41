"""Our API and dashboard beside another project's: a Procfile that runs none of our roles gets
them too (as `dashboard`), on a free port when the project's own web process listens on ours, and
commands in other terminals find them there."""

from __future__ import annotations

import json
import re
import socket

import pytest

from tests.helpers import Http, free_port

pytestmark = pytest.mark.processes

WEB = '''
from flask import Flask

app = Flask(__name__)


@app.get("/")
def index():
    return "theirs"
'''


def test_our_api_moves_to_a_free_port_when_the_projects_web_holds_ours(project):
    (project.dir / "web.py").write_text(WEB)
    # the project's Flask on our DIFY_PORT, as Dify's own runs on 5001
    (project.dir / "Procfile").write_text(f"api: flask --app web run --port {project.api_port}\n")
    stack = project.up()
    ready = [line for line in stack.lines if "ready in" in line][-1]
    found = re.search(r"API (http://127\.0\.0\.1:(\d+)) \(dashboard \1/dashboard; port (\d+) is api's\)", ready)
    assert found, ready
    ours, port = found.group(1), int(found.group(2))
    assert port != project.api_port and int(found.group(3)) == project.api_port
    assert "also api" in ready
    status, body = Http(f"http://127.0.0.1:{project.api_port}").get("/")
    assert (status, body) == (200, "theirs")  # their port stays theirs
    assert Http(ours).status("/dashboard") == 200
    status, health = Http(ours).get("/health")
    assert status in (200, 503) and "broker" in json.dumps(health)  # the stack's health, from our API
    rows = project.processes()
    assert rows["dashboard"]["status"] == "ready" and rows["api"]["status"] == "ready"
    # another terminal with the same environment (DIFY_PORT = the port their web holds) finds ours
    config = {row["name"]: row for row in json.loads(project.run("config", "--json").stdout)["settings"]}
    assert config["DIFY_PORT"]["value"] == str(port), config["DIFY_PORT"]
    assert "of the running `up`" in config["DIFY_PORT"]["source"]


def test_our_api_added_to_a_procfile_takes_a_free_port_when_ours_is_in_use(project):
    (project.dir / "web.py").write_text(WEB)
    (project.dir / "Procfile").write_text(f"web: flask --app web run --port {free_port()}\n")
    with socket.create_server(("127.0.0.1", project.api_port)):  # something else, not the project's
        stack = project.up()
        ready = [line for line in stack.lines if "ready in" in line][-1]
        found = re.search(r"API http://127\.0\.0\.1:(\d+) .*; port (\d+) is in use\)", ready)
        assert found and int(found.group(2)) == project.api_port, ready
        assert Http(f"http://127.0.0.1:{found.group(1)}").status("/dashboard") == 200


def test_up_with_names_runs_only_those(project):
    (project.dir / "web.py").write_text(WEB)
    (project.dir / "Procfile").write_text(f"web: flask --app web run --port {free_port()}\n")
    stack = project.up("web")
    assert "dashboard" not in project.processes()
    assert "API http" not in [line for line in stack.lines if "ready in" in line][-1]
