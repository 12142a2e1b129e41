"""Checks on this machine: the state folder writable with room to spare; the configured ports free
or held by this project's own processes, and otherwise which program holds them."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

import psutil

from runner.doctor.context import FAIL, PASS, Context, Result
from runner.errors import StateError
from runner.state import StatePaths
from runner.supervisor.preflight import port_in_use

# -- 7. state folder ---------------------------------------------------------------------------------


def check_state_folder(ctx: Context) -> Result:
    root = ctx.settings.state_dir
    min_free_mb = ctx.settings.DIFY_LOCAL_MIN_FREE_MB
    if root.exists() and not root.is_dir():
        return Result("state", FAIL, f"the state folder {root} is a file, not a folder",
                      fix="move that file away, or point DIFY_LOCAL_STATE_DIR at a folder")
    try:
        StatePaths(root).check()
    except StateError as error:  # "what is wrong; what to do", or "what is wrong: what to do"
        text = str(error)
        message, _, fix = text.partition("; ") if "; " in text else text.rpartition(": ")
        return Result("state", FAIL, message, fix=fix, data={"path": str(root)})
    # a folder not made yet is made by the first command that needs it: its nearest parent must take it
    target = root
    while not target.exists():
        target = target.parent
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".doctor-"):
            pass
    except OSError as error:
        return Result("state", FAIL, f"cannot write in {target}: {error.strerror or error}",
                      fix=f"make {target} writable by this user (chown/chmod), or point DIFY_LOCAL_STATE_DIR elsewhere",
                      data={"path": str(root)})
    free_mb = shutil.disk_usage(target).free / 2**20
    data = {"path": str(root), "exists": root.exists(), "free_mb": round(free_mb), "min_free_mb": min_free_mb}
    where = str(root) if root.exists() else f"{root} (not made yet; {target} takes it)"
    if free_mb < min_free_mb:
        return Result("state", FAIL, f"{where}: only {_size(free_mb)} free, below DIFY_LOCAL_MIN_FREE_MB "
                                     f"({min_free_mb} MB)",
                      fix="free space on that disk, or move the state folder (DIFY_LOCAL_STATE_DIR): a full disk "
                          "makes the broker refuse writes (MISCONF) and the database fail", data=data)
    return Result("state", PASS, f"{where} writable, {_size(free_mb)} free", data=data)


def _size(megabytes: float) -> str:
    return f"{megabytes / 1024:.1f} GB" if megabytes >= 1024 else f"{megabytes:.0f} MB"


# -- 8. ports ----------------------------------------------------------------------------------------

def check_ports(ctx: Context) -> Result:
    settings = ctx.settings
    ports = [("API", settings.DIFY_BIND_ADDRESS, settings.DIFY_PORT, "DIFY_PORT", "--port")]
    if settings.uses_embedded_broker:  # with CELERY_BROKER_URL no broker of ours listens
        ports.append(("embedded broker", settings.REDIS_HOST, settings.REDIS_PORT, "REDIS_PORT", "--broker-port"))
    lines, fixes, data = [], [], []
    for what, host, port, variable, flag in ports:
        entry = {"what": what, "host": host, "port": port}
        data.append(entry)
        if not port_in_use(host, port):
            entry.update(state="free", description="free", short="free")
        else:
            entry.update(_holder(ctx, port))
        lines.append(f"{what} {host}:{port}: {entry['description']}")
        if entry["state"] == "other":
            pids = " ".join(str(pid) for pid in entry["pids"])
            stop = f"stop it (`kill {pids}`)" if pids else "stop it"
            fixes.append(f"{what} port {port} is taken: {stop}, or give dify-local another port "
                         f"({variable}=N, or `dify-local up {flag} N`)")
    others = [entry for entry in data if entry["state"] == "other"]
    if others:
        return Result("ports", FAIL, "; ".join(f"{e['what']} port {e['port']} is held by another program"
                                               for e in others),
                      fix="; ".join(fixes), lines=lines, data={"ports": data})
    return Result("ports", PASS, "; ".join(f"{e['what']} port {e['port']}: {e['short']}" for e in data),
                  lines=lines, data={"ports": data})


def _holder(ctx: Context, port: int) -> dict:
    """Who listens on `port`: this project's running `up`, a dify-local process of this project
    started by hand, or another program (named with its pid)."""
    pids = sorted(listeners(port))
    if not pids:
        return {"state": "other", "pids": [],
                "description": "held by a process this user cannot see (another user's, or in a container)"}
    answer = ctx.supervisor()
    if answer is not None:
        supervisor = answer["supervisor"]["pid"]
        names = {row["pid"]: row["name"] for row in answer.get("processes", []) if row.get("pid")}
        for pid in pids:
            lineage = [pid, *_ancestors(pid)]
            if supervisor in lineage:
                process = next((names[p] for p in lineage if p in names), None)
                return {"state": "ours", "pids": pids, "short": f"this project's `up` (pid {supervisor})",
                        "description": f"this project's `up` (pid {supervisor})"
                                       + (f", its {process} (pid {pid})" if process else "")}
    for pid in pids:
        if _is_ours_by_hand(pid, ctx.settings.project_dir):
            return {"state": "ours", "pids": pids, "short": f"this project's, not under `up` (pid {pid})",
                    "description": f"this project's {describe_process(pid)}, not under `up`"}
    return {"state": "other", "pids": pids, "description": "held by " + ", ".join(describe_process(p) for p in pids)}


def listeners(port: int) -> set[int]:
    """Pids of the processes with a TCP socket listening on `port` (any address)."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return set()
    return {c.pid for c in connections
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}


def _ancestors(pid: int) -> list[int]:
    try:
        return [parent.pid for parent in psutil.Process(pid).parents()]
    except psutil.Error:
        return []


def _is_ours_by_hand(pid: int, project_dir: Path) -> bool:
    """A `dify-local serve …` (or `celery -A runner.app.celery`) run from this project's folder."""
    try:
        process = psutil.Process(pid)
        command = " ".join(process.cmdline())
        cwd = Path(process.cwd())
    except psutil.Error:
        return False
    return ("dify-local" in command or "runner" in command) and cwd.resolve() == Path(project_dir).resolve()


def describe_process(pid: int) -> str:
    """`name (pid N): command in folder` for a local process, as much as psutil may read of it."""
    try:
        process = psutil.Process(pid)
        name = process.name()
        argv = process.cmdline()
    except psutil.Error:
        return f"pid {pid}"
    # `python3 /venv/bin/dify-local serve beat` reads better as `dify-local serve beat`
    if len(argv) > 1 and Path(argv[0]).name.startswith("python") and not argv[1].startswith("-"):
        argv = argv[1:]
    if argv:
        argv = [Path(argv[0]).name, *argv[1:]]
    command = " ".join(argv)
    if len(command) > 70:
        command = command[:69] + "…"
    try:
        folder = f" in {process.cwd()}"
    except psutil.Error:
        folder = ""
    return f"{name} (pid {pid}): `{command}`{folder}" if command else f"{name} (pid {pid})"


def is_local(host: str | None, pid: int | None) -> bool:
    """Whether a heartbeat's (host, pid) is a process on this machine that psutil can see."""
    return bool(pid) and host == socket.gethostname() and psutil.pid_exists(pid)
