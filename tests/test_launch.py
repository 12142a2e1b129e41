"""How a Procfile command is launched: directly when it can be, so signals reach the program."""

from __future__ import annotations

import pytest

from runner.supervisor.process import launch

CASES = [
    ("dify-local serve worker -Q a,b", (["dify-local", "serve", "worker", "-Q", "a,b"], {})),
    # a ; or ( inside quotes is the program's, not the shell's
    ('python3 -c "import time; time.sleep(1)"', (["python3", "-c", "import time; time.sleep(1)"], {})),
    ("echo '$kept as is'", (["echo", "$kept as is"], {})),
    ('FOO=1 BAR="x y" python app.py', (["python", "app.py"], {"FOO": "1", "BAR": "x y"})),
    ("gunicorn -b :$PORT app:app", (["/bin/sh", "-c", "exec gunicorn -b :$PORT app:app"], {})),
    ('python -c "print(1)" > out.log', (["/bin/sh", "-c", 'exec python -c "print(1)" > out.log'], {})),
    ("migrate && serve", (["/bin/sh", "-c", "migrate && serve"], {})),
    ("FOO=1 run $X", (["/bin/sh", "-c", "FOO=1 run $X"], {})),
]


@pytest.mark.parametrize("command,expected", CASES, ids=[case[0] for case in CASES])
def test_launch(command, expected):
    assert launch(command) == expected
