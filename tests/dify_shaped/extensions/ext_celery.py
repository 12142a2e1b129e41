"""The Celery app, attached to the Flask app as an extension (`app.extensions["celery"]`), with the
task modules to import and a beat schedule built from the ENABLE_* switches, the way Dify's
extensions/ext_celery.py builds them."""

from datetime import timedelta

from celery import Celery, Task
from celery.schedules import crontab
from flask import Flask

from configs import dify_config


def init_app(app: Flask) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args, **kwargs):
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask, broker=dify_config.CELERY_BROKER_URL,
                        backend=dify_config.CELERY_BACKEND)
    celery_app.conf.update(
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        timezone=dify_config.LOG_TZ,
        task_ignore_result=True,
        # a route by name, beside the queue= options of the tasks themselves
        task_routes={"tasks.ops_trace_task.process_trace_tasks": {"queue": "ops_trace"}},
    )
    celery_app.set_default()
    app.extensions["celery"] = celery_app

    imports = [
        "tasks.document_indexing_task",
        "tasks.mail_invite_member_task",
        "tasks.ops_trace_task",
        "tasks.generate_summary_index_task",
        "tasks.async_workflow_tasks",
        "tasks.api_token_tasks",
        "tasks.trigger_subscription_refresh_tasks",
    ]
    day = dify_config.CELERY_BEAT_SCHEDULER_TIME
    beat_schedule = {}
    if dify_config.ENABLE_CLEAN_EMBEDDING_CACHE_TASK:
        imports.append("schedule.clean_embedding_cache_task")
        beat_schedule["clean_embedding_cache_task"] = {
            "task": "schedule.clean_embedding_cache_task.clean_embedding_cache_task",
            "schedule": crontab(minute="0", hour="2", day_of_month=f"*/{day}"),
        }
    if dify_config.ENABLE_CLEAN_MESSAGES:
        imports.append("schedule.clean_messages")
        beat_schedule["clean_messages"] = {
            "task": "schedule.clean_messages.clean_messages",
            "schedule": crontab(minute="0", hour="4", day_of_month=f"*/{day}"),
        }
    if dify_config.ENABLE_WORKFLOW_SCHEDULE_POLLER_TASK:
        imports.append("schedule.workflow_schedule_task")
        beat_schedule["workflow_schedule_task"] = {
            "task": "schedule.workflow_schedule_task.poll_workflow_schedules",
            "schedule": timedelta(minutes=dify_config.WORKFLOW_SCHEDULE_POLLER_INTERVAL),
        }
    if dify_config.ENABLE_TRIGGER_PROVIDER_REFRESH_TASK:
        imports.append("schedule.trigger_provider_refresh_task")
        beat_schedule["trigger_provider_refresh"] = {
            "task": "schedule.trigger_provider_refresh_task.trigger_provider_refresh",
            "schedule": timedelta(minutes=dify_config.TRIGGER_PROVIDER_REFRESH_INTERVAL),
        }
    celery_app.conf.update(beat_schedule=beat_schedule, imports=imports)
    return celery_app
