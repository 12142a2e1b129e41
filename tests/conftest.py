from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import Http, Proc, base_env, dify_local, free_port, port_open, redis_server_path, wait_until


@dataclass
class Project:
    """A temporary project folder with its own ports, and the processes started in it."""

    dir: Path
    broker_port: int
    api_port: int
    procs: list[Proc] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return base_env(REDIS_PORT=str(self.broker_port), DIFY_PORT=str(self.api_port))

    @property
    def state(self) -> Path:
        return self.dir / ".dify-local"

    @property
    def database(self) -> Path:
        return self.state / "metadata.db"

    @property
    def broker_url(self) -> str:
        return f"redis://:difyai123456@127.0.0.1:{self.broker_port}/1"

    @property
    def api(self) -> Http:
        return Http(f"http://127.0.0.1:{self.api_port}")

    def run(self, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*dify_local(), *args], cwd=self.dir, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *args: str, env: dict | None = None, argv: list[str] | None = None) -> Proc:
        proc = Proc(argv or [*dify_local(), *args], self.dir, {**self.env, **(env or {})})
        self.procs.append(proc)
        return proc

    def up(self, *args: str, env: dict | None = None, timeout: float = 90) -> Proc:
        """`dify-local up`, returned once it prints its ready line."""
        proc = self.start("up", *args, env=env)
        proc.wait_for_line(r"ready in [\d.]+ s", timeout=timeout)
        return proc

    def serve_broker(self) -> Proc:
        proc = self.start("serve", "broker")
        wait_until(lambda: port_open(self.broker_port), 20, "the embedded broker to listen")
        return proc


@pytest.fixture
def project(tmp_path: Path):
    folder = tmp_path / "project"
    folder.mkdir()
    made = Project(folder, free_port(), free_port())
    yield made
    for proc in made.procs:
        proc.cleanup()


@pytest.fixture
def redis_server(tmp_path: Path):
    """A real redis-server on a free loopback port (Debian's package; CI installs it)."""
    binary = redis_server_path()
    if binary is None:
        if os.environ.get("DIFY_LOCAL_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is required here (DIFY_LOCAL_REQUIRE_REDIS=1) but not installed")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = Proc([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--requirepass", "realredispw", "--dir", str(tmp_path)], tmp_path, base_env())
    try:
        wait_until(lambda: port_open(port), 20, "redis-server to listen")
        yield f"redis://:realredispw@127.0.0.1:{port}"
    finally:
        proc.cleanup()
