from celery import shared_task

from extensions.ext_database import db


@shared_task(name="mail_count")
def mail_count():
    return len(db.metadata.tables)
