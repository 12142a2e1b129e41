"""A plain Flask app, as `flask run` serves one: the benchmarks' anchor for the API."""

from flask import Flask

app = Flask(__name__)


@app.get("/health")
def health():
    return "ok"
