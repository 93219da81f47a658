"""Prometheus metrics of the service, one set per process; gunicorn's workers share them through
PROMETHEUS_MULTIPROC_DIR (set by service/server/gunicorn_conf.py), read by GET /metrics."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as _multiprocess

REQUESTS = Counter("simsvc_requests_total", "HTTP requests answered", ["route", "endpoint", "status"])
REQUEST_SECONDS = Histogram(
    "simsvc_request_seconds",
    "Time to answer an HTTP request",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_IMAGES = Histogram(
    "simsvc_batch_images", "Images per forward pass of a query encoder", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
ENCODER_SECONDS = Histogram(
    "simsvc_encoder_seconds",
    "Seconds per forward pass of a query encoder",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
)
IMAGES_DECODED = Counter("simsvc_images_decoded_total", "Query images decoded", ["outcome"])
JOBS = Counter("simsvc_jobs_total", "Training jobs and catalog adds finished", ["kind", "status"])
JOB_SECONDS = Histogram(
    "simsvc_job_seconds", "Duration of jobs", ["kind"], buckets=(1, 5, 15, 60, 300, 900, 3600, 14400)
)
# One series per worker and endpoint (versions are not labels: a catalog that changes every
# hour would add a series an hour): the creation time of the version it serves, Unix seconds.
# Version ids are that time, so `GET /<endpoint>/versions` maps it back to an id.
SERVED_VERSION = Gauge(
    "simsvc_served_version_created_seconds",
    "When the version a worker serves was created (version ids are this time)",
    ["endpoint"],
    multiprocess_mode="liveall",
)
DEGRADED = Gauge(
    "simsvc_endpoint_degraded",
    "1 while an endpoint's store is unreachable (serving what it has)",
    ["endpoint"],
    multiprocess_mode="livemax",
)


def exposition() -> bytes:
    """The metrics in Prometheus' text format: every worker's, when several share a folder."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()


BLOB_CACHE = Counter(
    "simsvc_blob_cache_total",
    "Blobs a worker needed: found in this instance's cache, or downloaded",
    ["outcome"],
)
BLOB_CACHE_BYTES = Counter(
    "simsvc_blob_cache_downloaded_bytes_total", "Bytes of blobs downloaded into the cache"
)
SEGMENTS = Gauge(
    "simsvc_segments", "Segments of the version a worker serves", ["endpoint"], multiprocess_mode="livemax"
)
