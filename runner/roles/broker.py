"""MODE=broker: the embedded Redis-protocol broker on loopback, password required."""

from __future__ import annotations

import errno
import logging

import fakeredis

from runner.broker.server import EmbeddedBroker
from runner.roles.common import RoleStartError, start_role, stop_on_signals
from runner.settings import Settings
from runner.settings.kinds import is_loopback, mask_url

log = logging.getLogger("dify_local.broker")


class BrokerStartError(RoleStartError):
    pass


def serve_broker(settings: Settings) -> None:
    start_role(settings, "broker")
    host, port, password = settings.REDIS_HOST, settings.REDIS_PORT, settings.REDIS_PASSWORD
    if not is_loopback(host) and not password:
        raise BrokerStartError(f"REDIS_HOST={host} is not loopback: the embedded broker needs REDIS_PASSWORD there")
    try:
        server = EmbeddedBroker(host, port, password)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise BrokerStartError(
                f"port {port} on {host} is in use (another Redis or dify-local?): set REDIS_PORT or "
                f"use --broker-port, or point CELERY_BROKER_URL at that Redis") from None
        raise BrokerStartError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    stop_on_signals(server.shutdown)
    log.info("embedded broker (fakeredis %s) listening on %s", fakeredis.__version__,
             mask_url(settings.embedded_url(0)).rsplit("/", 1)[0])
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    log.info("embedded broker stopped")
