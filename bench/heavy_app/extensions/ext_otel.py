"""Tracing as Dify's ext_otel sets it up: OpenTelemetry's SDK, an OTLP exporter, instrumentation for Flask,
Celery and SQLAlchemy."""

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider


def init_app(app):
    provider = TracerProvider(resource=Resource.create({"service.name": "heavy-app"}))
    trace.set_tracer_provider(provider)
    app.extensions["otel"] = (OTLPSpanExporter, FlaskInstrumentor, CeleryInstrumentor, SQLAlchemyInstrumentor)
