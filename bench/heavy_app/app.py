"""As Dify's api/app.py: the Flask app from its factory; `celery -A app.celery worker` finds its Celery app."""

from app_factory import create_app

app = create_app()
celery = app.extensions["celery"]
