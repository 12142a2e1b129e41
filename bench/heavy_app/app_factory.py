import time

from flask import Flask

from configs import heavy_config


def create_app() -> Flask:
    started = time.perf_counter()
    app = Flask(__name__)
    app.config.from_mapping(heavy_config.model_dump())
    from extensions import ext_celery, ext_cors, ext_database, ext_llm, ext_login, ext_migrate, ext_numeric, ext_restx
    from extensions import ext_otel, ext_storage

    for extension in (ext_database, ext_migrate, ext_login, ext_cors, ext_restx, ext_storage, ext_llm, ext_numeric,
                      ext_otel, ext_celery):
        extension.init_app(app)
    app.config["STARTUP_SECONDS"] = time.perf_counter() - started
    return app
