"""local_config/defaults.env, written from the settings table so it can never drift from it."""

from __future__ import annotations

import textwrap

from runner.settings.table import GROUPS, SETTINGS

HEADER = """\
# dify-local settings: every setting with its default, commented out.
#
# Precedence: built-in defaults < local_config/*.env (alphabetical) < environment < command line.
# Put your overrides in local_config/local.env (git-ignored), e.g.  CELERY_WORKER_AMOUNT=2
# Names are Dify's, so lines from a Dify .env work unchanged. A blank value means the default.
# `dify-local config` prints every effective value and where it came from.
# This file is generated from runner/settings/table.py; edit that, not this.
"""


def render_defaults_env() -> str:
    parts = [HEADER]
    for group in GROUPS:
        parts.append(f"\n# --- {group} ---\n")
        for setting in SETTINGS:
            if setting.group != group:
                continue
            help_text = setting.help + (f" (default: {setting.default_note})" if setting.default_note else "")
            parts.extend(f"# {line}\n" for line in textwrap.wrap(help_text, 96))
            default = "" if setting.default_factory else setting.kind.format(setting.default)
            parts.append(f"# {setting.name}={default}\n")
    return "".join(parts)
