from celery import shared_task


@shared_task(queue="api_token")
def batch_update_api_token_last_used_task() -> int:
    return 0
