"""As Dify's ext_celery: a Celery app whose tasks run in the Flask app context, task modules listed in `imports`."""

from celery import Celery, Task


def init_app(app):
    class FlaskTask(Task):
        def __call__(self, *args, **kwargs):
            with app.app_context():
                return self.run(*args, **kwargs)

    url = app.config["CELERY_BROKER_URL"]
    celery_app = Celery(app.name, task_cls=FlaskTask, broker=url, backend=url)
    celery_app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                           broker_connection_retry_on_startup=True,
                           imports=["tasks.probe_task", "tasks.document_tasks", "tasks.mail_tasks"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app
