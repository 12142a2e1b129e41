"""MODE=broker: the embedded Redis-protocol broker on loopback, password required, durable."""

from __future__ import annotations

import asyncio
import logging

import fakeredis

from runner.broker.lua_sandbox import set_time_limit
from runner.broker.server import BrokerStartError as ServerStartError
from runner.broker.server import COMPILED_UNAVAILABLE, EmbeddedBroker
from runner.roles.common import RoleStartError, start_role
from runner.settings import Settings
from runner.settings.kinds import mask_url
from runner.state import StatePaths
from runner.state_access import StateFolderBusy, StateFolderRefused, broker_lock

log = logging.getLogger("dify_local.broker")


def run(coroutine) -> None:
    """The event loop: uvloop's (libuv, in C) where it is installed, asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
        return
    uvloop.run(coroutine)


class BrokerStartError(RoleStartError):
    pass


def serve_broker(settings: Settings, password: bool = True) -> None:
    paths = start_role(settings, "broker")
    lock = broker_lock(paths.root)  # one broker per state folder: two would write one log
    try:
        lock.acquire()
    except (StateFolderBusy, StateFolderRefused) as error:
        raise BrokerStartError(str(error)) from None
    try:
        _serve(settings, paths, password)
    finally:
        lock.release()


def _serve(settings: Settings, paths: StatePaths, password: bool) -> None:
    host, port = settings.REDIS_HOST, settings.REDIS_PORT
    folder = paths.broker if settings.DIFY_LOCAL_BROKER_PERSIST else None
    if password and not settings.REDIS_PASSWORD:
        # only when CELERY_BROKER_URL is set: the password is then that URL's, not one of ours
        raise BrokerStartError("the embedded broker has no password to require: REDIS_PASSWORD is empty and "
                               "CELERY_BROKER_URL names a broker of its own; set REDIS_PASSWORD (or --password) to "
                               "the password in that URL, or use --no-password on loopback")
    try:
        broker = EmbeddedBroker(host, port, settings.REDIS_PASSWORD if password else None, folder,
                                compiled=settings.DIFY_LOCAL_BROKER_COMPILED)
        set_time_limit(broker.core, settings.DIFY_LOCAL_BROKER_LUA_TIME_LIMIT)
        report = broker.load()  # (refuses a log path that is a link or a folder)
    except ServerStartError as error:
        raise BrokerStartError(str(error)) from None
    if folder is None:
        log.info("persistence off (--no-persist): the data lives in memory only and is gone when it stops")
    elif report.commands:
        log.info("restored %d writes from %s in %.2f s: %d keys", report.commands, broker.aof.path, report.seconds,
                 broker.key_count())
    else:
        log.info("append-only log %s: nothing to restore; writes are fsynced every second", broker.aof.path)
    if report.set_aside is not None:
        log.warning("the append-only log ended with %s: restored everything before it (%d writes); the last %d "
                    "bytes are kept in %s (look at them, then delete the file)", report.reason, report.commands,
                    report.set_aside_bytes, report.set_aside)
    if report.failed:
        log.warning("%d logged writes failed to replay (listed above)", report.failed)
    address = mask_url(settings.embedded_url(0)).rsplit("/", 1)[0] if password else f"redis://{host}:{port}"
    if settings.DIFY_LOCAL_BROKER_COMPILED and not broker.compiled:
        log.warning("the broker's read loop runs in Python, about 10%% slower: %s", COMPILED_UNAVAILABLE)
    loop = "compiled read loop" if broker.compiled else "Python read loop"
    log.info("embedded broker (fakeredis %s, %s) listening on %s", fakeredis.__version__, loop, address)
    try:
        run(broker.serve())
    except ServerStartError as error:
        raise BrokerStartError(str(error)) from None
    log.info("embedded broker stopped")
