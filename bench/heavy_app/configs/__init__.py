"""Settings as Dify composes them: many pydantic-settings mixins, read from the environment and .env."""

from pydantic import Field, computed_field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _section(name: str, count: int) -> type:
    fields = {f"{name.upper()}_OPTION_{index}": (int, Field(default=index, description=f"{name} option {index}"))
              for index in range(count)}
    annotations = {key: kind for key, (kind, _) in fields.items()}
    namespace = {key: default for key, (_, default) in fields.items()}
    namespace["__annotations__"] = annotations
    return type(f"{name.title()}Config", (BaseSettings,), namespace)


SECTIONS = [_section(name, 25) for name in (
    "deployment", "feature", "database", "redis", "celery", "storage", "vector", "model", "mail", "login",
    "billing", "workflow", "plugin", "tracing", "security", "logging")]


class HeavyConfig(*SECTIONS):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    CELERY_BROKER_URL: str = "redis://127.0.0.1:6379/1"
    SQLALCHEMY_DATABASE_URI_VALUE: str = "sqlite://"
    STORAGE_TYPE: str = "opendal"
    STORAGE_LOCAL_PATH: str = "storage"
    S3_REGION: str = "us-east-1"

    @computed_field
    @property
    def CELERY_RESULT_BACKEND(self) -> str:  # noqa: N802 - Dify's names
        return self.CELERY_BROKER_URL


heavy_config = HeavyConfig()
