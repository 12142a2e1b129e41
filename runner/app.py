"""Entry module for Celery's own CLI, as Dify's `app.celery`:

    celery -A runner.app.celery worker -P threads -c 2 -Q dataset,priority_dataset
    celery -A runner.app.celery inspect active

Settings are read from the current folder's local_config/ and the environment.
"""

from runner.celery_app import create_celery_app
from runner.recording import install_task_recording
from runner.settings import load_settings

celery = create_celery_app(load_settings(), wait_out_refused_writes=True)
install_task_recording(celery)
