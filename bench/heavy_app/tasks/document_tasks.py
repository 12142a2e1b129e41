from celery import shared_task

from extensions.ext_database import db


@shared_task(name="document_count")
def document_count():
    return len(db.metadata.tables)
