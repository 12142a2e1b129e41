"""The queue topology: the seed's 16 queues, their priority class, and the route of every task.

This is the single source of truth for queue names and routes. It depends on nothing else in the
package, so settings can validate queue names against it.

Priority classes are made real by the order a worker consumes its queues in: kombu's Redis
transport asks BRPOP for the queues in the consumer's order, and with `queue_order_strategy =
priority` it keeps that order instead of rotating it. `consumption_order` sorts any queue list by
class, so a high queue's backlog is always served before a normal one, and `retention` last.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Iterable


class Priority(IntEnum):
    HIGH = 0
    NORMAL = 1
    LOW = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class QueueSpec:
    name: str
    priority: Priority
    work: str


QUEUES: tuple[QueueSpec, ...] = (
    QueueSpec("priority_dataset", Priority.HIGH, "user-triggered knowledge-base indexing"),
    QueueSpec("priority_pipeline", Priority.HIGH, "user-triggered document pipeline"),
    QueueSpec("dataset", Priority.NORMAL, "indexing, index updates, batch segments"),
    QueueSpec("pipeline", Priority.NORMAL, "extraction → cleaning → chunking"),
    QueueSpec("mail", Priority.NORMAL, "notification mail"),
    QueueSpec("ops_trace", Priority.NORMAL, "traces and metrics"),
    QueueSpec("app_deletion", Priority.NORMAL, "cascade clean-up of an app"),
    QueueSpec("plugin", Priority.NORMAL, "plugin install and checks"),
    QueueSpec("workflow_storage", Priority.NORMAL, "persisting workflow run logs"),
    QueueSpec("conversation", Priority.NORMAL, "conversation data"),
    QueueSpec("workflow", Priority.NORMAL, "executing workflow graphs"),
    QueueSpec("schedule_poller", Priority.NORMAL, "polling scheduled workflows"),
    QueueSpec("schedule_executor", Priority.NORMAL, "running a scheduled workflow"),
    QueueSpec("triggered_workflow_dispatcher", Priority.NORMAL, "webhook-triggered runs"),
    QueueSpec("trigger_refresh_executor", Priority.NORMAL, "refreshing trigger subscriptions"),
    QueueSpec("retention", Priority.LOW, "retention and clean-up"),
)

QUEUE_NAMES: tuple[str, ...] = tuple(queue.name for queue in QUEUES)
BY_NAME: dict[str, QueueSpec] = {queue.name: queue for queue in QUEUES}

# Every task the project defines, and the queue it is sent to. Celery's own tasks (celery.*) are
# not listed: they run wherever they are sent.
ROUTES: dict[str, str] = {
    # knowledge base: user-triggered work on the priority queues, background work on the normal ones
    "priority_document_indexing_task": "priority_dataset",
    "document_indexing_task": "dataset",
    "clean_unused_datasets_task": "dataset",
    "create_tidb_serverless_task": "dataset",
    "update_tidb_serverless_status_task": "dataset",
    "priority_document_segments_indexing_task": "priority_dataset",
    "document_segments_indexing_task": "dataset",
    "document_indexing_update_task": "dataset",
    "batch_create_segment_to_index_task": "dataset",
    "priority_rag_pipeline_run_task": "priority_pipeline",
    "rag_pipeline_run_task": "pipeline",
    "priority_document_pipeline_task": "priority_pipeline",
    "document_pipeline_task": "pipeline",
    # mail
    "send_mail_task": "mail",
    "mail_clean_document_notify_task": "mail",
    "send_reset_password_mail_task": "mail",
    "send_indexing_finished_mail_task": "mail",
    "send_queue_alert_mail_task": "mail",
    # operations
    "process_trace_tasks": "ops_trace",
    "clean_embedding_cache_task": "ops_trace",
    "datasets_queue_monitor": "ops_trace",
    "remove_app_and_related_data_task": "app_deletion",
    "check_upgradable_plugin_task": "plugin",
    "install_plugin_task": "plugin",
    "uninstall_plugin_task": "plugin",
    # conversations
    "save_message_task": "conversation",
    "clean_messages": "conversation",
    # workflows, schedules and triggers
    "run_workflow_task": "workflow",
    "save_workflow_run_log_task": "workflow_storage",
    "workflow_schedule_poller_task": "schedule_poller",
    "run_schedule_trigger": "schedule_executor",
    "dispatch_triggered_workflow_task": "triggered_workflow_dispatcher",
    "refresh_trigger_subscription_task": "trigger_refresh_executor",
    # retention
    "clean_task_runs_task": "retention",
    "clean_expired_tokens_task": "retention",
    "clean_temp_files_task": "retention",
    "clean_old_logs_task": "retention",
    "clean_queue_samples_task": "retention",
}


def tasks_on(queue: str) -> list[str]:
    """The tasks routed to `queue`, in declaration order."""
    return [task for task, routed in ROUTES.items() if routed == queue]


def consumption_order(queues: Iterable[str]) -> tuple[str, ...]:
    """`queues` sorted by priority class (high, normal, low), keeping the topology's order within a class.

    Names outside the topology (a user project's own queues) keep their given order after the
    normal class and before the low one.
    """
    position = {name: index for index, name in enumerate(QUEUE_NAMES)}
    unique = list(dict.fromkeys(queues))

    def key(item: tuple[int, str]) -> tuple[int, int]:
        given, name = item
        spec = BY_NAME.get(name)
        if spec is None:
            return (Priority.NORMAL, len(position) + given)
        return (spec.priority, position[name])

    return tuple(name for _, name in sorted(enumerate(unique), key=key))


def unconsumed_routes(consumed: Iterable[str]) -> list[tuple[str, str]]:
    """(task, queue) for every route whose queue is not in `consumed`."""
    consumed = set(consumed)
    return [(task, queue) for task, queue in ROUTES.items() if queue not in consumed]


def unknown_queue_problems(queues: Iterable[str], where: str) -> list[str]:
    """One line per queue of `queues` our backend has no task for (a typo), `where` naming the setting
    or option that gave it. A project's own Celery app is never checked against these 16."""
    return [f"{where}: unknown queue {queue!r} for dify-local's worker; allowed: " + ", ".join(QUEUE_NAMES)
            for queue in queues if queue not in BY_NAME]
