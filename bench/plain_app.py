"""A plain Celery app, as a project without dify-local would write it: the benchmarks' anchor."""

import os

from celery import Celery

app = Celery("plain", broker=os.environ["BENCH_BROKER_URL"], backend=os.environ["BENCH_BROKER_URL"],
             include=["bench.trivial"])
app.conf.update(accept_content=["json"], task_serializer="json", result_serializer="json",
                broker_connection_retry_on_startup=True)
