"""Task modules, one per domain. Importing them registers their tasks with the Celery app."""

TASK_MODULES: tuple[str, ...] = (
    "runner.tasks.dataset",
    "runner.tasks.pipeline",
    "runner.tasks.mail",
    "runner.tasks.ops",
    "runner.tasks.apps",
    "runner.tasks.plugin",
    "runner.tasks.workflow",
    "runner.tasks.retention",
)
