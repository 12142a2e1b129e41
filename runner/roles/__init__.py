"""The seed's run modes, each a long-running process: broker, api, worker, beat (and job)."""

ROLES = ("broker", "api", "worker", "beat")
