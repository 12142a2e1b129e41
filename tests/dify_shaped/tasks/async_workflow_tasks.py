from celery import shared_task


@shared_task(queue="workflow_based_app_execution")
def execute_workflow_task(task_data: dict) -> dict:
    return {"status": "succeeded", **task_data}
