from celery import shared_task


@shared_task(queue="dataset")
def document_indexing_task(dataset_id: str, document_ids: list[str]) -> int:
    return len(document_ids)


@shared_task(queue="priority_dataset")
def priority_document_indexing_task(dataset_id: str, document_ids: list[str]) -> int:
    return len(document_ids)
