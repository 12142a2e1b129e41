"""The module `celery -A app.celery` and `flask run` load: `app` (Flask) and `celery` (its Celery
extension), as Dify's api/app.py exposes them."""

from app_factory import create_app

app = create_app()
celery = app.extensions["celery"]

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=5001)
