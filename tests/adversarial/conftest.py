"""Adversarial tests (issue 16): organised by kind of attack, each kind many instances. All are
marked `adversarial`, so `-m "not adversarial"` leaves them out and `-m adversarial` runs them alone."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.adversarial)
