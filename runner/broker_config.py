"""How to reach the broker, for Celery and for kombu alone: transport and TLS options from the
settings, and the keys dify-local itself keeps there. Imports neither Celery nor kombu."""

from __future__ import annotations

import ssl
from typing import Any

BEAT_HEARTBEAT_KEY = "dify-local:beat:heartbeat"  # written by beat at every tick, read by `up` and doctor


def transport_options(settings: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        # Keep the consumer's queue order instead of rotating it: that order is the priority order
        # (see runner.topology.consumption_order).
        "queue_order_strategy": "priority",
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
    # Certificates are verified (Dify ships ssl_cert_reqs=None, which accepts any server).
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED}
