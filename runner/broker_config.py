"""How to reach the broker, for Celery and for kombu alone: transport and TLS options from the
settings, the keys dify-local itself keeps there, and what to say when the broker cannot be
reached. Imports neither Celery nor kombu (kombu only when a connection is asked for)."""

from __future__ import annotations

import ssl
from typing import Any

from runner.settings.kinds import mask_url

BEAT_HEARTBEAT_KEY = "dify-local:beat:heartbeat"  # written by beat at every tick, read by `up` and doctor
# beat's entries with their last and next runs (JSON), written by beat when they change, read by the
# API: it neither imports the task modules nor opens beat's schedule file
BEAT_SCHEDULE_KEY = "dify-local:beat:schedule"
# One key per running beat and per worker node, each with a TTL, read by doctor: a second beat, or a
# worker that died or hangs, shows as its own key (or as one whose time stopped moving).
BEAT_INSTANCE_PREFIX = "dify-local:beat:instance:"
WORKER_HEARTBEAT_PREFIX = "dify-local:worker:heartbeat:"


def beat_instance_key(host: str, pid: int) -> str:
    return f"{BEAT_INSTANCE_PREFIX}{host}:{pid}"


def worker_heartbeat_key(node: str) -> str:
    return f"{WORKER_HEARTBEAT_PREFIX}{node}"


# Seconds added to the derived visibility timeout: the wait for a free pool slot after a countdown,
# the ack's round trip, clocks of two processes.
VISIBILITY_MARGIN = 60
VISIBILITY_FORMULA = ("DIFY_LOCAL_MAX_COUNTDOWN + CELERY_WORKER_PREFETCH_MULTIPLIER × DIFY_LOCAL_TASK_TIME_LIMIT + "
                      f"{VISIBILITY_MARGIN}")
# Seconds between the worker's sweeps of the unacked messages for those older than the visibility
# timeout. kombu's default (10 s, scanning on every 10th call: about 100 s) would let a killed
# worker's tasks wait that long after the timeout; a sweep is a few commands, so every 2 s costs nothing.
RESTORE_INTERVAL = 2
# Transport options that concern consuming only; the result backend is given the others.
CONSUMER_OPTIONS = ("queue_order_strategy", "visibility_timeout", "unacked_restore_interval",
                    "unacked_restore_throttle")


def visibility_timeout(settings: Any) -> int:
    """Seconds a delivered message may stay unacknowledged before the broker delivers it again.

    kombu's Redis transport emulates acks: a message a worker takes sits in the `unacked` hash until
    acked, and any worker's sweep puts it back in its queue once it is older than this. With
    acks_late (runner.celery_app) that is how the tasks of a worker killed with -9 come back; kombu's
    default, an hour, is too long to wait for them. Too short is worse: a message is also held while
    its countdown runs out (eta), while it waits behind the tasks reserved before it (the prefetch
    multiplier), and while its task runs, and one held longer is delivered again and runs twice. So:
    the longest countdown the API accepts, plus a time limit per task the worker may hold per slot,
    plus a margin. The time limit is enforced only by the prefork and gevent pools (README, Settings).
    """
    if settings.DIFY_LOCAL_VISIBILITY_TIMEOUT is not None:
        return settings.DIFY_LOCAL_VISIBILITY_TIMEOUT
    return (settings.DIFY_LOCAL_MAX_COUNTDOWN
            + settings.CELERY_WORKER_PREFETCH_MULTIPLIER * settings.DIFY_LOCAL_TASK_TIME_LIMIT + VISIBILITY_MARGIN)


def transport_options(settings: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        # Keep the consumer's queue order instead of rotating it: that order is the priority order
        # (see runner.topology.consumption_order).
        "queue_order_strategy": "priority",
        "visibility_timeout": visibility_timeout(settings),
        # A sweep every RESTORE_INTERVAL seconds, each one scanning (throttle 1): a message comes back
        # at most that long after its visibility timeout passed.
        "unacked_restore_interval": RESTORE_INTERVAL,
        "unacked_restore_throttle": 1,
    }
    if settings.CELERY_USE_SENTINEL:
        options["master_name"] = settings.CELERY_SENTINEL_MASTER_NAME
        options["sentinel_kwargs"] = {"socket_timeout": settings.CELERY_SENTINEL_SOCKET_TIMEOUT}
        if settings.CELERY_SENTINEL_PASSWORD:
            options["sentinel_kwargs"]["password"] = settings.CELERY_SENTINEL_PASSWORD
    return options


def ssl_options(settings: Any) -> dict[str, Any] | None:
    if not settings.uses_ssl:
        return None
    # Certificates are verified (Dify ships ssl_cert_reqs=None, which accepts any server); against
    # REDIS_SSL_CA_CERTS when it names a CA, else the system's CAs. The same dict serves kombu
    # (broker_use_ssl) and Celery's Redis result backend (redis_backend_use_ssl).
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    for key, name in (("ssl_ca_certs", "REDIS_SSL_CA_CERTS"), ("ssl_certfile", "REDIS_SSL_CERTFILE"),
                      ("ssl_keyfile", "REDIS_SSL_KEYFILE")):
        path = settings.path(name)
        if path is not None:
            options[key] = str(path)
    return options


def broker_connection(settings: Any, timeout: float | None = None):
    """A kombu connection to the broker, opened on first use, with the options the roles use (so a
    sentinel:// or rediss:// URL that works here works for them). `timeout` bounds every socket
    operation, for callers that must not hang on a silent host."""
    from kombu import Connection

    options = transport_options(settings)
    extra: dict[str, Any] = {}
    if timeout is not None:
        options.update(socket_timeout=timeout, socket_connect_timeout=timeout)
        extra["connect_timeout"] = timeout
    return Connection(settings.broker_url, transport_options=options, ssl=ssl_options(settings) or False, **extra)


# -- why the broker could not be reached ---------------------------------------------------------

UNREACHABLE, TIMEOUT, WRONG_PASSWORD, NO_PASSWORD, TLS, CERTIFICATE, NO_MASTER, OTHER = (
    "unreachable", "timeout", "wrong password", "no password", "tls", "certificate", "no master", "other")
FINAL = (WRONG_PASSWORD, NO_PASSWORD, CERTIFICATE)  # retrying does not help: the settings must change


def error_chain(error: BaseException | None) -> list[BaseException]:
    """The error and the errors it was raised from (kombu wraps redis-py's in its own)."""
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def broker_error_kind(error: BaseException) -> tuple[str, str]:
    """(kind, the reason in a few words) for an error met while talking to the broker."""
    import redis
    from redis.sentinel import MasterNotFoundError

    chain = error_chain(error)
    for link in chain:
        text = str(link)
        if isinstance(link, MasterNotFoundError):
            return NO_MASTER, text.split(" : ")[0]
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            return CERTIFICATE, text
        if isinstance(link, ssl.SSLError) or "[SSL" in text:
            return TLS, text
        if "without any password configured" in text:
            return WRONG_PASSWORD, "the server has no password, yet one was given"
        if isinstance(link, redis.AuthenticationError) or "NOAUTH" in text or "WRONGPASS" in text:
            if "invalid" in text or "WRONGPASS" in text:
                return WRONG_PASSWORD, "the password was refused"
            return NO_PASSWORD, "it asks for a password and none was given"
    for link in chain:  # something listens but does not answer: not the same advice as nothing listening
        if isinstance(link, (redis.TimeoutError, TimeoutError)):
            return TIMEOUT, str(link)
    for link in chain:
        if isinstance(link, (redis.ConnectionError, OSError)):
            return UNREACHABLE, str(link)
    return OTHER, f"{type(chain[-1]).__name__}: {chain[-1]}"


def _password_source(settings: Any) -> str:
    source = settings.source("REDIS_PASSWORD")
    return f"here: {source}" if source.startswith("generated") else f"here from {source}"


def broker_advice(kind: str, settings: Any) -> str:
    """What to do about a broker error of `kind`."""
    embedded = settings.uses_embedded_broker
    if kind == UNREACHABLE:
        return ("is it running? `dify-local up` starts it (or `dify-local serve broker`)" if embedded
                else "is that Redis running, and is CELERY_BROKER_URL right (rediss:// for a TLS port)?")
    if kind == TIMEOUT and settings.uses_ssl:
        return ("no TLS handshake in time: does that port speak TLS? rediss:// and BROKER_USE_SSL are for a "
                "Redis TLS port (tls-port); a plain port waits silently")
    if kind == TIMEOUT:
        return ("something listens on REDIS_PORT but does not answer: another program on that port, or a "
                "broker that is stopped or overloaded (`dify-local doctor` names what holds the port)" if embedded
                else "something listens there but does not answer: is it a Redis server (rediss:// for a TLS "
                     "port), and not stopped or overloaded?")
    if kind == WRONG_PASSWORD:
        return (f"check REDIS_PASSWORD: it must be the password the embedded broker was started with "
                f"({_password_source(settings)})" if embedded
                else "check the password in CELERY_BROKER_URL (redis://:PASSWORD@host:port/db)")
    if kind == NO_PASSWORD:
        return (f"set REDIS_PASSWORD to the embedded broker's password ({_password_source(settings)})" if embedded
                else "put the password in CELERY_BROKER_URL (redis://:PASSWORD@host:port/db; "
                     "for sentinels, the master's password in each sentinel://:PASSWORD@host:port)")
    if kind == CERTIFICATE:
        return ("if the server's certificate is signed by a CA of your own, name that CA's PEM file in "
                "REDIS_SSL_CA_CERTS (the certificate must also name the host of the URL)")
    if kind == TLS:
        return "does that port speak TLS? rediss:// and BROKER_USE_SSL are for a Redis TLS port (tls-port)"
    if kind == NO_MASTER:
        return (f"do the sentinels run, and do they watch a master named "
                f"{settings.CELERY_SENTINEL_MASTER_NAME!r} (CELERY_SENTINEL_MASTER_NAME)? "
                "CELERY_SENTINEL_PASSWORD is the sentinels' own password, if they have one")
    return "is CELERY_BROKER_URL a Redis server?"


def explain_broker_error(error: BaseException, settings: Any, url: str) -> tuple[str, str]:
    """(kind, one line: what failed, at which URL (password masked), why, and what to do)."""
    kind, reason = broker_error_kind(error)
    what = "the embedded broker" if settings.uses_embedded_broker else "the broker"
    return kind, f"cannot use {what} at {mask_url(url)}: {reason.rstrip('. ')}; {broker_advice(kind, settings)}"
