from app import celery


@celery.task(queue="schedule_poller")
def poll_workflow_schedules() -> int:
    return 0
