from celery import shared_task


@shared_task(queue="dataset_summary")
def generate_summary_index_task(dataset_id: str, document_id: str) -> str:
    return document_id
