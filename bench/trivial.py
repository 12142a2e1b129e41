"""The trivial task both workers run in the benchmarks."""

from celery import shared_task


@shared_task(name="bench.add")
def add(a: int, b: int) -> int:
    return a + b
