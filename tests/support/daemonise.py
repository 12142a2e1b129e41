"""A Procfile line of another project that starts a daemon, the classic way: fork, setsid, fork
again, so the daemon has no parent to die with, no process group and no session of its caller's.

    python3 daemonise.py PORT PIDFILE [--clean-env]

The daemon listens on 127.0.0.1:PORT and writes its pid to PIDFILE once it does; the launcher
itself stays in the foreground (a supervisor would restart it if it exited). --clean-env: the
daemon re-executes itself with an empty environment, as some daemons do, so that nothing in it
says who started it.
"""

from __future__ import annotations

import os
import socket
import sys
import time


def serve(port: int, pidfile: str) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    partial = f"{pidfile}.partial"
    with open(partial, "w") as out:
        out.write(str(os.getpid()))
    os.replace(partial, pidfile)
    while True:
        connection, _ = listener.accept()
        connection.close()


def main() -> None:
    if sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), sys.argv[3])
        return
    port, pidfile = sys.argv[1], sys.argv[2]
    clean = "--clean-env" in sys.argv[3:]
    first = os.fork()
    if first == 0:
        os.setsid()
        if os.fork() == 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            argv = [sys.executable, os.path.abspath(__file__), "--serve", port, pidfile]
            os.execve(sys.executable, argv, {} if clean else dict(os.environ))
        os._exit(0)
    os.waitpid(first, 0)
    print(f"daemon started on port {port}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
