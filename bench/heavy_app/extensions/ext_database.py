from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


def init_app(app):
    app.config["SQLALCHEMY_DATABASE_URI"] = app.config["SQLALCHEMY_DATABASE_URI_VALUE"]
    db.init_app(app)
    import models  # noqa: F401 - the models register on the metadata, as Dify's do
    with app.app_context():
        db.create_all()
