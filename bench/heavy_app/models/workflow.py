"""SQLAlchemy models of the workflow domain (many tables with many columns, as in Dify's models/)."""

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from extensions.ext_database import db


def _model(name: str, parent: str | None) -> type:
    namespace = {
        "__tablename__": name,
        "id": mapped_column(String(36), primary_key=True),
        "created_at": mapped_column(DateTime, default=datetime.utcnow),
        "__annotations__": {"id": Mapped[str], "created_at": Mapped[datetime]},
    }
    for index in range(12):
        kind = (String(255), Integer, Boolean, Text, JSON)[index % 5]
        namespace[f"field_{index}"] = mapped_column(kind, nullable=True)
    if parent:
        namespace["parent_id"] = mapped_column(String(36), ForeignKey(f"{parent}.id"), nullable=True)
    return type(name.title().replace("_", ""), (db.Model,), namespace)


MODELS = []
for number in range(10):
    MODELS.append(_model(f"workflow_{number}", f"workflow_{number - 1}" if number else None))
