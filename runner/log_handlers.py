"""A rotating log file that survives a full disk: logging's handler prints a "--- Logging error ---"
traceback for every record it cannot write; this one says so in one line on standard error, once,
drops those records, and says so again once the file takes them (space came back)."""

from __future__ import annotations

import logging
import logging.handlers
import sys


class RotatingLogFile(logging.handlers.RotatingFileHandler):
    failing = False  # the last record could not be written

    def emit(self, record: logging.LogRecord) -> None:
        self._refused = False
        super().emit(record)  # (its errors come to handleError)
        if self.failing and not self._refused:
            self.failing = False
            _say(f"dify-local: the log file {self.baseFilename} is written again")

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        self._refused = True
        # The next record reopens the file: a stream whose flush failed keeps failing.
        stream, self.stream = self.stream, None
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
        if not self.failing:
            self.failing = True
            _say(f"dify-local: cannot write the log file {self.baseFilename} ({error.strerror or error}); its lines "
                 "are not kept until it can be written again (free space on its disk)")


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # no terminal to say it on
        pass
