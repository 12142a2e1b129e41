import flask_migrate

from extensions.ext_database import db


def init_app(app):
    flask_migrate.Migrate(app, db)
