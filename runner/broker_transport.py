"""kombu's Redis transports for the processes that wait out a broker refusing writes (the worker,
beat): their clients retry refused writes (runner.write_refusal), and a refused BRPOP (a pop is a
write) is a pause before the next one, not an error that stops the worker. Installed
for the URL schemes by `install` (runner.celery_app)."""

from __future__ import annotations

import time
from queue import Empty

from kombu.transport import redis as kombu_redis

from runner.write_refusal import LONGEST_PAUSE, WAIT, BrokerRefusesWrites, WaitingRedis


class WaitingChannelMixin:
    def _get_client(self):
        client = super()._get_client()
        return WaitingRedis if client is kombu_redis.redis.Redis else client  # (with a key prefix: kombu's own)

    def _brpop_read(self, **options):
        try:
            delivered = super()._brpop_read(**options)
        except Empty:
            WAIT.accepted()  # the BRPOP (a write) was taken, it found nothing
            raise
        except BrokerRefusesWrites as error:
            # Nothing was popped. The consumer's loop sends the next BRPOP; it waits a little first,
            # and meanwhile still answers signals (a warm shutdown) between the tries.
            WAIT.refused(error)
            time.sleep(LONGEST_PAUSE / 2)
            raise Empty() from None
        WAIT.accepted()
        return delivered


class WaitingChannel(WaitingChannelMixin, kombu_redis.Channel):
    pass


class WaitingSentinelChannel(WaitingChannelMixin, kombu_redis.SentinelChannel):
    pass


class Transport(kombu_redis.Transport):
    Channel = WaitingChannel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = WaitingSentinelChannel


def install() -> None:
    """Use these for redis://, rediss:// and sentinel:// URLs in this process (before its first
    connection): kombu resolves a URL's scheme through TRANSPORT_ALIASES. By scheme rather than by
    Celery's `broker_transport`, so the URL the worker shows (its banner, `inspect stats`) stays the
    user's."""
    from kombu import transport

    for scheme, name in (("redis", "Transport"), ("rediss", "Transport"), ("sentinel", "SentinelTransport")):
        transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:{name}"
        transport._transport_cache.pop(scheme, None)
