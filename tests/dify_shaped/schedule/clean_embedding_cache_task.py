from app import celery


@celery.task(queue="dataset")
def clean_embedding_cache_task() -> int:
    return 0
