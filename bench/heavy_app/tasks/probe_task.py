from celery import shared_task

VALUE = 0


@shared_task(name="probe_value")
def probe_value():
    return VALUE
