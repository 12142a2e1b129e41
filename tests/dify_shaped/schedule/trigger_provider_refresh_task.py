from app import celery


# The deliberate bug, as Dify shipped it: this queue is in no worker's -Q of the Procfile, so beat
# sends here every minute and nothing runs it (`dify-local topology` and `doctor` find it).
@celery.task(queue="trigger_refresh_publisher")
def trigger_provider_refresh() -> int:
    return 0
