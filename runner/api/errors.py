"""Every error the API returns is JSON: {"error": message, ...details}, with a 4xx status where
the request was at fault, 503 when the broker or database is unreachable, and 500 naming the path
when the state folder holds something only the user can fix (a link, a corrupt database)."""

from __future__ import annotations

import errno
import logging
import sqlite3

import redis
from flask import Flask, jsonify
from kombu.exceptions import OperationalError
from werkzeug.exceptions import HTTPException

from runner.errors import StateError
from runner.write_refusal import BrokerRefusesWrites, refused_writes
from runner.store.database import DatabaseBusy

log = logging.getLogger("dify_local.api")


BROKER_DISK_FULL = ("the broker refuses writes: its disk is full (MISCONF); nothing was sent: free space on the "
                    "state folder's disk and send again")
DATABASE_DISK_FULL = ("the metadata database cannot be written: its disk is full (database or disk is full): free "
                      "space on the state folder's disk and try again")


class ApiError(Exception):
    def __init__(self, status: int, message: str, **details):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


def error_response(status: int, message: str, **details):
    response = jsonify({"error": message, **details})
    response.status_code = status
    return response


def install_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(error: ApiError):
        return error_response(error.status, error.message, **error.details)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        # a 400 werkzeug raises is about the body as a whole (a multipart form it cannot parse)
        details = {"field": None} if error.code == 400 else {}
        return error_response(error.code or 500, error.description or error.name, **details)

    @app.errorhandler(OperationalError)
    @app.errorhandler(redis.ConnectionError)
    @app.errorhandler(redis.TimeoutError)
    @app.errorhandler(BrokerRefusesWrites)
    def broker_unreachable(error: Exception):
        if refused_writes(error) is not None:
            return error_response(503, BROKER_DISK_FULL)
        return error_response(503, f"the broker is unreachable: {error}")

    @app.errorhandler(DatabaseBusy)
    @app.errorhandler(sqlite3.OperationalError)
    def database_unavailable(error: Exception):
        if "disk is full" in str(error):  # SQLITE_FULL
            return error_response(503, DATABASE_DISK_FULL)
        return error_response(503, f"the metadata database is unavailable: {error}")

    @app.errorhandler(OSError)
    def disk_full(error: OSError):
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error_response(503, f"the state folder's disk is full ({error.strerror}): free space and try again")
        return unexpected(error)

    @app.errorhandler(StateError)
    def state_unusable(error: StateError):  # a link in the state folder, a corrupt database: the user must act
        log.error("%s", error)
        return error_response(500, str(error))

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(error).__name__}")
