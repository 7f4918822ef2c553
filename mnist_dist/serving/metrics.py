"""The server's Prometheus metrics, all named ``mnist_dist_*``, and their exposition at ``/metrics``.

With several worker processes (``serve --workers N``) each process writes its
figures to files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's
multiprocess mode) and ``/metrics``, whichever worker answers it, adds up
every worker's. The variable must be set before prometheus-client is first
imported; ``serving.server`` does so before it starts the workers.
"""
from __future__ import annotations

import functools
import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess

PREFIX = "mnist_dist"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

REQUESTS = Counter(f"{PREFIX}_requests", "HTTP requests answered, by route template, method and status code",
                   ["route", "method", "status"])
REQUEST_SECONDS = Histogram(f"{PREFIX}_request_seconds", "Time from a request's arrival to its answer",
                            ["route"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge(f"{PREFIX}_requests_in_flight", "Requests being handled now", multiprocess_mode="livesum")
MODEL = ["model", "version"]
QUEUE_SECONDS = Histogram(f"{PREFIX}_queue_wait_seconds", "Time requests waited for the batcher to take them",
                          MODEL, buckets=LATENCY_BUCKETS)
BATCH_IMAGES = Histogram(f"{PREFIX}_batch_images", "Images in one model run", MODEL, buckets=BATCH_BUCKETS)
MODEL_SECONDS = Histogram(f"{PREFIX}_model_run_seconds", "Time of one model run", MODEL, buckets=LATENCY_BUCKETS)
IMAGES = Counter(f"{PREFIX}_images", "Images answered, by outcome: labelled by the model, or failed to read",
                 ["outcome", *MODEL])
LOADS = Counter(f"{PREFIX}_model_loads", "Model versions loaded, by outcome: loaded, or failed (the version "
                "serving before goes on serving)", [*MODEL, "outcome"])
UNLOADS = Counter(f"{PREFIX}_model_unloads", "Model versions unloaded (after answering every request they took)",
                  MODEL)
LOAD_SECONDS = Histogram(f"{PREFIX}_model_load_seconds", "Time to open, check and warm up a model version",
                         ["model"], buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0))
READY = Gauge(f"{PREFIX}_model_ready", "1 while a model version takes requests (summed over server processes)",
              MODEL, multiprocess_mode="livesum")
REJECTED = Counter(f"{PREFIX}_rejected", "Requests refused before the model: queue full (503) or timed out (504)",
                   ["reason"])

DOCUMENTED = [REQUESTS, REQUEST_SECONDS, IN_FLIGHT, QUEUE_SECONDS, BATCH_IMAGES, MODEL_SECONDS, IMAGES, REJECTED,
              LOADS, UNLOADS, LOAD_SECONDS, READY]


@functools.cache
def images(outcome: str, model: str, version: str):
    """The images counter of one outcome and model version, looked up once per process (labels() takes a lock each
    call)."""
    return IMAGES.labels(outcome, model, version)


class BatcherStats:
    """One model version's batcher figures, as metrics."""

    def __init__(self, model: str, version: str) -> None:
        self.images, self.run_s = BATCH_IMAGES.labels(model, version), MODEL_SECONDS.labels(model, version)
        self.queue_s = QUEUE_SECONDS.labels(model, version)

    def batch(self, images: int, run_s: float) -> None:
        self.images.observe(images)
        self.run_s.observe(run_s)

    def waited(self, seconds: float) -> None:
        self.queue_s.observe(seconds)


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def exposition() -> tuple:
    """(body, content type) of the text format, every worker's figures added up in multiprocess mode."""
    if not multiprocess():
        return generate_latest(), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    prometheus_multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def process_exited(pid: int) -> None:
    """A worker that stops takes its live gauges with it."""
    if multiprocess():
        prometheus_multiprocess.mark_process_dead(pid)


def readme_table(reports: list) -> str:
    """The README's list of metrics, from their definitions (``reports`` is unused: nothing is measured)."""
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for metric in DOCUMENTED:
        scraped = f"{metric._name}_total" if metric._type == "counter" else metric._name  # as Prometheus sees it
        lines.append(f"| `{scraped}` | {metric._type} | {', '.join(metric._labelnames)} | {metric._documentation} |")
    return "\n".join(lines)
