"""The API's OpenAPI document: it describes every route the app has (and nothing else), and a
property-based run of schemathesis against the running stack finds no server error."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import BIN

PARAMETER = re.compile(r"\{[^}]+\}")


def normalised(path: str) -> str:
    return PARAMETER.sub("{}", path)


def test_every_route_is_described_and_nothing_else(project):
    project.up()
    status, document = project.api.get("/openapi.json")
    assert status == 200 and document["openapi"].startswith("3.")
    described = {(normalised(path), method.upper()) for path, item in document["paths"].items()
                 for method in item if method in ("get", "post", "put", "patch", "delete")}

    from runner.api import create_api
    from runner.celery_app import create_celery_app
    from runner.settings import load_settings

    settings = load_settings(project.dir, environ=project.env)
    app = create_api(settings, create_celery_app(settings, register_tasks=False))
    routes = {(normalised(re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)), method)
              for rule in app.url_map.iter_rules() if rule.endpoint != "static"
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert routes - described == set(), "routes without a description"
    assert described - routes == set(), "described but not routes"


def test_schemathesis_finds_no_server_error(project, tmp_path: Path):
    project.up()
    schemathesis = BIN / "schemathesis"
    command = [str(schemathesis)] if schemathesis.exists() else [sys.executable, "-m", "schemathesis.cli"]
    assert shutil.which(command[0]) or Path(command[0]).exists()
    run = subprocess.run(
        [*command, "run", f"http://127.0.0.1:{project.api_port}/openapi.json",
         "--checks", "not_a_server_error", "--max-examples", "40", "--seed", "1",
         "--request-timeout", "10", "--wait-for-schema", "30", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    tested = re.search(r"(\d+) generated", output)
    assert tested and int(tested.group(1)) > 50, output[-3000:]  # it did send requests
