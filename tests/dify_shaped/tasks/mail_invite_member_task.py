from celery import shared_task


@shared_task(queue="mail")
def send_invite_member_mail_task(language: str, to: str, token: str) -> str:
    return f"invited {to}"
