"""The app's settings, read by pydantic-settings from the environment and `.env` (the environment wins),
as Dify's `configs.dify_config` is. Only what the Celery side needs."""

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class DifyShapedConfig(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    CELERY_BROKER_URL: str = "redis://:difyai123456@localhost:6379/1"
    CELERY_BACKEND: str = "redis"
    CELERY_BEAT_SCHEDULER_TIME: int = Field(default=1, description="days between the clean-ups' runs")
    LOG_TZ: str = "UTC"

    # beat's switches, as Dify's CeleryScheduleTasksConfig names them
    ENABLE_CLEAN_EMBEDDING_CACHE_TASK: bool = False
    ENABLE_CLEAN_UNUSED_DATASETS_TASK: bool = False
    ENABLE_CLEAN_MESSAGES: bool = False
    ENABLE_MAIL_CLEAN_DOCUMENT_NOTIFY_TASK: bool = False
    ENABLE_DATASETS_QUEUE_MONITOR: bool = False
    QUEUE_MONITOR_INTERVAL: int = 30
    ENABLE_WORKFLOW_SCHEDULE_POLLER_TASK: bool = True
    WORKFLOW_SCHEDULE_POLLER_INTERVAL: int = 1  # minutes
    ENABLE_TRIGGER_PROVIDER_REFRESH_TASK: bool = True
    TRIGGER_PROVIDER_REFRESH_INTERVAL: int = 1  # minutes


dify_config = DifyShapedConfig()
