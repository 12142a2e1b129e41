"""What a program of another project gets from dify-local: the broker's address, on top of its own
environment (what the user set). Never our backend's settings (MAIL_TYPE, MODE, CELERY_QUEUES …:
a Dify app reads the same names and dies on ours, `Unsupported mail type outbox`), nor our
metadata database; those belong to dify-local's own roles.

A project is another project when its Procfile runs none of dify-local's backend roles
(`dify-local serve api|worker|beat`); a folder without a Procfile runs the built-in backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from runner.settings import Settings
    from runner.supervisor.procfile import ProcessSpec

OUR_BACKEND_ROLES = ("api", "worker", "beat")


def runs_our_backend(specs: Iterable[ProcessSpec]) -> bool:
    return any(spec.is_ours and spec.role in OUR_BACKEND_ROLES for spec in specs)


def broker_environment(settings: Settings) -> dict[str, str]:
    """Where the broker is, under the names Celery, Redis clients and a Dify app read."""
    if not settings.uses_embedded_broker:
        return {"CELERY_BROKER_URL": settings.broker_url}
    # host, port and password apart too (generated or set), as a Dify app's config reads them
    return {"CELERY_BROKER_URL": settings.broker_url, "REDIS_URL": settings.embedded_url(0),
            "REDIS_HOST": settings.REDIS_HOST, "REDIS_PORT": str(settings.REDIS_PORT),
            "REDIS_PASSWORD": settings.REDIS_PASSWORD}
