"""The API process's own Prometheus registry: each domain's routes register what they
observe as requests arrive on it, and `/metrics` serves it with the service-wide metrics
read at scrape time (`moderation.main.metrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

REGISTRY = CollectorRegistry()
