"""dify-local: Dify's Celery backend on one machine."""

__version__ = "0.1.0"
