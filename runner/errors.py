"""Errors that report several problems at once, one complete line each (bad settings, bad options),
and the one kind every command and role reports the same way: a state folder it cannot use."""


# The exit status of a role that stopped over something only the user can fix (sysexits' EX_CONFIG):
# `up` marks it failed instead of restarting it, with or without reload (which has its own channel).
EXIT_USER_MUST_FIX = 78


class ProblemsError(Exception):
    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


class StateError(Exception):
    """The state folder, or something in it, cannot be used as it is (a symbolic link, a file where a
    folder belongs, no write permission, a corrupt database). The message names the path and says
    what to do; only the user can fix it, so a role that stops over one is not restarted.
    `exit_status` 2 when the fix is a setting (DIFY_LOCAL_STATE_DIR names a file), as for any bad setting."""

    def __init__(self, message: str, exit_status: int = 1):
        super().__init__(message)
        self.exit_status = exit_status
