"""Prometheus metrics shared by the API and the workers.

With PROMETHEUS_MULTIPROC_DIR set (before this module is imported), every process writes its
values to files there and `registry()` adds them up, so `serve --workers N` and prefork workers
report one total; `serve --workers N` sets it to a fresh temporary folder when it is unset.
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0)

HTTP_REQUESTS = Counter(
    "maml_serve_http_requests_total",
    "HTTP requests by route template and status.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "maml_serve_http_request_duration_seconds",
    "HTTP request latency.",
    ["method", "route"],
    buckets=_FAST,
)
JOB_QUEUE_TIME = Histogram(
    "maml_serve_job_queue_seconds",
    "Time from a job's creation to its first claim.",
    ["kind"],
    buckets=_SLOW,
)
JOB_DURATION = Histogram(
    "maml_serve_job_duration_seconds",
    "Time from a job's claim to its end.",
    ["kind", "state"],
    buckets=_SLOW,
)
JOBS_FINISHED = Counter(
    "maml_serve_jobs_finished_total", "Jobs that reached an end state.", ["kind", "state"]
)
ADAPT_COMPUTE = Histogram(
    "maml_serve_adaptation_compute_seconds",
    "Inner-loop time of one adaptation.",
    ["mode"],
    buckets=_FAST,
)
PREDICT_COMPUTE = Histogram(
    "maml_serve_prediction_compute_seconds",
    "Forward-pass time of one prediction request.",
    buckets=_FAST,
)
RATE_LIMITS_DEGRADED = Counter(
    "maml_serve_rate_limits_degraded_total",
    "Times Redis did not count a request and the process fell back to its own limits.",
)
PREDICTED_IMAGES = Counter("maml_serve_predicted_images_total", "Query images predicted.")
CACHE_HITS = Counter("maml_serve_model_cache_hits_total", "Model cache hits.", ["cache"])
CACHE_MISSES = Counter("maml_serve_model_cache_misses_total", "Model cache misses.", ["cache"])
CACHE_BYTES = Gauge(
    "maml_serve_model_cache_bytes",
    "Bytes held by the adapted-model cache.",
    multiprocess_mode="livesum",
)
JOB_HAND_BACKS = Counter(
    "maml_serve_job_hand_backs_total", "Jobs handed back at shutdown (no attempt spent).", ["kind"]
)
RESENDS = Counter("maml_serve_job_resends_total", "Job messages re-sent by the reaper.", ["kind"])
STORAGE_WAITS = Counter(
    "maml_serve_job_storage_waits_total",
    "Runs of a job put off because the artifact store was unavailable (claim kept).",
    ["kind"],
)
LEASE_EXPIRIES = Counter(
    "maml_serve_job_lease_expiries_total",
    "Running jobs found with an expired lease, by what the reaper did.",
    ["outcome"],
)
JOB_ATTEMPTS = Counter(
    "maml_serve_job_attempts_total",
    "Claims of a job by a worker (each counts an attempt).",
    ["kind"],
)

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The folder processes share their values through, or None (one process, in memory)."""
    return os.environ.get(MULTIPROCESS_ENV) or None


def registry() -> CollectorRegistry:
    """What to expose: every process's values when they share a folder, else this process's."""
    folder = multiprocess_dir()
    if folder is None:
        return REGISTRY
    shared = CollectorRegistry()
    multiprocess.MultiProcessCollector(shared, path=folder)  # type: ignore[no-untyped-call]
    return shared
