"""create_app(): a Flask app with its extensions initialised, as Dify's app_factory does."""

from flask import Flask


def create_app() -> Flask:
    app = Flask("dify-shaped")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    from extensions import ext_celery

    ext_celery.init_app(app)
    return app
