from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import (
    Http,
    Proc,
    base_env,
    dify_local,
    free_port,
    port_open,
    redis_server_path,
    require_compiled_loop,
    wait_until,
)


@dataclass
class Project:
    """A temporary project folder with its own ports, and the processes started in it."""

    dir: Path
    broker_port: int
    api_port: int
    procs: list[Proc] = field(default_factory=list)
    # how `dify-local` is run, and the environment under it: the test's virtualenv, or (the binary
    # tests) the built binary with a clean environment
    program: list[str] = field(default_factory=dify_local)
    base: dict[str, str] | None = None

    @property
    def env(self) -> dict[str, str]:
        ports = {"REDIS_PORT": str(self.broker_port), "DIFY_PORT": str(self.api_port)}
        return {**self.base, **ports} if self.base is not None else base_env(**ports)

    @property
    def state(self) -> Path:
        return self.dir / ".dify-local"

    @property
    def database(self) -> Path:
        return self.state / "metadata.db"

    @property
    def broker_password(self) -> str:
        """The broker's password as a second terminal of the user's finds it: the one set in this
        project's environment, else the one the stack generated in its state folder (so read it
        once the stack, or `serve broker`, has started)."""
        given = self.env.get("REDIS_PASSWORD")
        if given:
            return given
        path = self.state / "broker-password"
        assert path.is_file(), f"no {path}: start the stack (or its broker) before asking for its password"
        return path.read_text(encoding="ascii").strip()

    @property
    def broker_url(self) -> str:
        """This project's embedded broker, with its password, on Celery's database 1."""
        return f"redis://:{self.broker_password}@127.0.0.1:{self.broker_port}/1"

    @property
    def api(self) -> Http:
        return Http(f"http://127.0.0.1:{self.api_port}")

    def processes(self) -> dict[str, dict]:
        """The rows of `dify-local ps --json` by process name (it must answer)."""
        done = self.run("ps", "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        return {row["name"]: row for row in json.loads(done.stdout)["processes"]}

    def run(self, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*self.program, *args], cwd=self.dir, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *args: str, env: dict | None = None, argv: list[str] | None = None) -> Proc:
        proc = Proc(argv or [*self.program, *args], self.dir, {**self.env, **(env or {})})
        self.procs.append(proc)
        return proc

    def up(self, *args: str, env: dict | None = None, timeout: float = 90) -> Proc:
        """`dify-local up`, returned once it prints its ready line."""
        proc = self.start("up", *args, env=env)
        proc.wait_for_line(r"ready in [\d.]+ s", timeout=timeout)
        return proc

    def serve_broker(self, env: dict | None = None) -> Proc:
        proc = self.start("serve", "broker", env=env)
        wait_until(lambda: port_open(self.broker_port), 20, "the embedded broker to listen")
        return proc


# The embedded broker's two read loops (runner/broker/session.py): the compiled one, and the
# Python one it mirrors. Tests of what the broker answers run on both.
READ_LOOPS = {"compiled": {"DIFY_LOCAL_BROKER_COMPILED": "true"}, "python": {"DIFY_LOCAL_BROKER_COMPILED": "false"}}


@pytest.fixture(params=list(READ_LOOPS))
def read_loop(request) -> dict[str, str]:
    """The environment that picks one of the broker's read loops (the compiled one must be built)."""
    if request.param == "compiled":
        require_compiled_loop()
    return READ_LOOPS[request.param]


@contextlib.contextmanager
def made_project(parent: Path) -> Iterator[Project]:
    """A project in `parent`/project with ports of its own; every process it started is cleaned up
    after. The `project` fixture is one per test; a module fixture makes one to share."""
    folder = parent / "project"
    folder.mkdir()
    made = Project(folder, free_port(), free_port())
    try:
        yield made
    finally:
        for proc in made.procs:
            proc.cleanup()


@pytest.fixture
def project(tmp_path: Path):
    with made_project(tmp_path) as made:
        yield made


# -- real Redis: plain, behind sentinels, and over TLS ----------------------------------------------

REAL_PASSWORD = "realredispw"


def _needed(what: str) -> None:
    """Skip for want of `what`, or fail when DIFY_LOCAL_REQUIRE_REDIS=1 (the `redis_server` rule)."""
    if os.environ.get("DIFY_LOCAL_REQUIRE_REDIS") == "1":
        pytest.fail(f"{what} is required here (DIFY_LOCAL_REQUIRE_REDIS=1)")
    pytest.skip(f"{what} is not available")


def _redis_binary() -> str:
    binary = redis_server_path()
    if binary is None:
        _needed("redis-server (apt-get install redis-server)")
    return binary


def _start_redis(argv: list[str], folder: Path, port: int, what: str) -> Proc:
    """A redis-server process, returned once `port` listens; its output is shown if it gives up."""
    proc = Proc(argv, folder, base_env())
    try:
        wait_until(lambda: port_open(port) or proc.popen.poll() is not None, 20, f"{what} to listen")
    except AssertionError:
        proc.cleanup()
        raise
    if proc.popen.poll() is not None:
        proc.cleanup()
        raise RuntimeError(f"{what} exited ({proc.popen.returncode}):\n{proc.output}")
    return proc


def start_real_redis(folder: Path, port: int | None = None) -> tuple[str, Proc]:
    """A memory-only redis-server on loopback requiring REAL_PASSWORD: its URL (no database) and process."""
    binary = _redis_binary()
    port = port or free_port()
    proc = _start_redis([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                         "--requirepass", REAL_PASSWORD, "--dir", str(folder)], folder, port, f"redis-server on {port}")
    return f"redis://:{REAL_PASSWORD}@127.0.0.1:{port}", proc


@pytest.fixture
def redis_server(tmp_path: Path):
    """A real redis-server on a free loopback port (Debian's package; CI installs it)."""
    url, proc = start_real_redis(tmp_path)
    try:
        yield url
    finally:
        proc.cleanup()


@dataclass
class SentinelRedis:
    """A master with a password, watched by two sentinels under the name `master_name`."""

    master_port: int
    sentinel_ports: list[int]
    password: str = REAL_PASSWORD
    master_name: str = "mymaster"

    def broker_url(self, password: str | None = None, db: int = 1) -> str:
        """Dify's form: each sentinel with the master's password and the database."""
        auth = f":{self.password if password is None else password}@" if password != "" else ""
        return ";".join(f"sentinel://{auth}127.0.0.1:{port}/{db}" for port in self.sentinel_ports)


@pytest.fixture
def redis_sentinel(tmp_path: Path):
    binary = _redis_binary()
    folder = tmp_path / "sentinel"
    folder.mkdir()
    procs: list[Proc] = []
    try:
        setup = SentinelRedis(free_port(), [free_port(), free_port()])
        procs.append(start_real_redis(folder, setup.master_port)[1])
        for port in setup.sentinel_ports:
            conf = folder / f"sentinel-{port}.conf"  # sentinels rewrite their file: each its own, writable
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                            f"sentinel monitor {setup.master_name} 127.0.0.1 {setup.master_port} 1\n"
                            f"sentinel auth-pass {setup.master_name} {setup.password}\n")
            procs.append(_start_redis([binary, str(conf), "--sentinel"], folder, port, f"the sentinel on {port}"))
        yield setup
    finally:
        for proc in procs:
            proc.cleanup()


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA of our own and a server certificate it signed for 127.0.0.1, made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        _needed("the openssl command (apt-get install openssl), to make the test certificates,")
    paths = {name: folder / f"{name}.pem" for name in ("ca", "ca-key", "server", "server-key", "csr")}
    extensions = folder / "server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                          "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
                          "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        ["req", "-x509", *key, "-days", "2", "-subj", "/CN=dify-local test CA",
         "-keyout", paths["ca-key"], "-out", paths["ca"]],
        ["req", *key, "-subj", "/CN=127.0.0.1", "-keyout", paths["server-key"], "-out", paths["csr"]],
        ["x509", "-req", "-in", paths["csr"], "-CA", paths["ca"], "-CAkey", paths["ca-key"], "-CAcreateserial",
         "-days", "2", "-extfile", extensions, "-out", paths["server"]],
    ]
    for step in steps:
        done = subprocess.run([openssl, *map(str, step)], cwd=folder, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            pytest.fail(f"openssl {step[0]} failed ({done.returncode}): {done.stderr.strip()}")
    return paths


@dataclass
class TlsRedis:
    port: int
    ca: Path
    password: str = REAL_PASSWORD

    def broker_url(self, db: int = 1) -> str:
        return f"rediss://:{self.password}@127.0.0.1:{self.port}/{db}"


@pytest.fixture
def redis_tls(tmp_path: Path):
    """A real redis-server speaking TLS only, with a certificate signed by a CA made for the test."""
    binary = _redis_binary()
    folder = tmp_path / "tls"
    folder.mkdir()
    paths = make_certificates(folder)
    port = free_port()
    argv = [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file",
            str(paths["server"]), "--tls-key-file", str(paths["server-key"]), "--tls-ca-cert-file", str(paths["ca"]),
            "--tls-auth-clients", "no", "--requirepass", REAL_PASSWORD, "--save", "", "--appendonly", "no",
            "--dir", str(folder)]
    try:
        proc = _start_redis(argv, folder, port, "redis-server with TLS")
    except RuntimeError as error:
        if "Bad directive" in str(error) or "not supported" in str(error).lower():  # built without TLS
            _needed(f"a redis-server built with TLS ({error})")
        raise
    try:
        yield TlsRedis(port, paths["ca"])
    finally:
        proc.cleanup()


# -- the inner loop: `pytest -m unit` ---------------------------------------------------------------

# Fixtures that start processes or servers. A test that uses none of them, and whose module does not
# say it starts processes itself (`pytestmark = pytest.mark.processes`), is marked `unit`: the
# seconds-long loop to run on every edit (`./dev test -m unit`).
PROCESS_FIXTURES = {"project", "redis_server", "redis_sentinel", "redis_tls", "read_loop"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("processes") is None and not PROCESS_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.unit)
