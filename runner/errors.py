"""Errors that report several problems at once, one complete line each (bad settings, bad options)."""


class ProblemsError(Exception):
    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))
