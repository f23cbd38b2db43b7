"""Service settings, read from the environment (prefix MAML_SERVE_)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_KEY_PEPPER = "maml-serve-development-pepper"


class Settings(BaseSettings):
    """Every knob of the service; the defaults are the embedded, offline setup."""

    model_config = SettingsConfigDict(env_prefix="MAML_SERVE_", env_file=None, extra="ignore")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path("data")
    # None: an SQLite file in data_dir (the embedded default).
    database_url: SecretStr | None = None
    # None: jobs run in this process on a thread pool; a redis:// URL: they go to Celery.
    broker_url: SecretStr | None = None
    # None: the initializations shipped with fewshot (one per domain: handwritten characters,
    # photos); each becomes its domain's first active version. Else only this folder (plus
    # extra_initialization_paths, e.g. MAML_SERVE_EXTRA_INITIALIZATION_PATHS='["/models/x"]').
    initialization_path: Path | None = None
    extra_initialization_paths: list[Path] = Field(default_factory=list)
    # Where artifacts (support images over the inline size, adapted weights, initializations,
    # datasets) live: "local", a folder in data_dir (the embedded default), or "s3", a bucket of
    # an S3-compatible server shared by every host. Credentials come from the usual AWS
    # environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, a profile or an instance role),
    # never from these settings.
    artifact_backend: Literal["local", "s3"] = "local"
    s3_bucket: str | None = None
    # Keys go under this prefix in the bucket ("" for the bucket's root).
    s3_prefix: str = ""
    # None: AWS; else the server's URL (http://seaweedfs:8333), addressed path-style.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    # Bounds, so an S3 outage answers 503 within seconds instead of hanging a request:
    # connecting, each read, and attempts per request (the first one included).
    s3_connect_timeout_seconds: float = Field(default=2.0, gt=0)
    s3_read_timeout_seconds: float = Field(default=5.0, gt=0)
    s3_max_attempts: int = Field(default=3, ge=1)
    # The S3 backend keeps verified local copies of what it reads as files (initializations,
    # adapted weights, datasets) in data_dir, at most this many bytes (least recently used go).
    artifact_cache_bytes: int = Field(default=2 * 1024 * 1024 * 1024, gt=0)
    # A job that finds the artifact store unavailable keeps its claim (its lease renewed, its
    # attempt not spent, its row's progress_detail saying so) and runs again after 1, 2, 4, 8,
    # then every 10 s, for at most this long in all; then the attempt fails like any other
    # error (code storage_unavailable once the attempts are spent). 0: no waiting.
    storage_wait_seconds: float = Field(default=300.0, ge=0)
    # Mixed into the hash of every API key; changing it invalidates all keys.
    api_key_pepper: SecretStr = SecretStr(DEFAULT_KEY_PEPPER)

    # The serving processes' memory allocator: "auto" (jemalloc when installed), "jemalloc"
    # (required) or "system" (glibc's malloc). See app/core/allocator.py.
    allocator: Literal["auto", "jemalloc", "system"] = "auto"

    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    max_image_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    # Checked from the image header, before any pixel is decoded.
    max_image_pixels: int = Field(default=4096 * 4096, gt=0)
    max_support_images: int = Field(default=500, gt=1)
    # Support images up to this size are kept in their database row (committed with the task,
    # no file to create and fsync); larger ones, and all with 0, go to the artifact store.
    # At most max_support_images times this per task in the database.
    support_inline_max_bytes: int = Field(default=16 * 1024, ge=0)
    max_query_images: int = Field(default=256, gt=0)
    max_label_length: int = Field(default=200, gt=0)
    max_steps: int = Field(default=100, ge=0)
    max_wait_seconds: float = Field(default=60.0, ge=0)
    # Query images are kept decoded at most this many pixels on a side (an initialization's input
    # is at most 224), so a request holds one full-size image at a time, never all of them.
    max_decoded_side: int = Field(default=256, ge=8)
    # Values (array items, object members) a JSON body may hold, counted before it is parsed.
    max_json_values: int = Field(default=4096, gt=0)
    # A request body that sends nothing for this long is answered 408 and its resources freed.
    body_read_timeout_seconds: float = Field(default=30.0, gt=0)
    # Threads for sync routes and dependencies (anyio's limiter); the pool is sized to them.
    api_threads: int = Field(default=40, gt=0)
    # None: api_threads + executor_threads + 4, so no thread ever waits for a connection.
    db_pool_size: int | None = Field(default=None, gt=0)
    # Per API key: sustained requests per second, the burst above it, and requests in flight.
    key_rate_per_second: float = Field(default=20.0, gt=0)
    key_rate_burst: int = Field(default=40, gt=0)
    key_max_in_flight: int = Field(default=16, gt=0)
    # Failed key attempts per client address per minute before it is answered 429.
    max_failed_auth_per_minute: int = Field(default=20, gt=0)
    # With a broker, key rates and failed attempts are counted in its Redis, shared by every API
    # process (app.core.shared_limits); false keeps them per process, as the embedded default.
    shared_rate_limits: bool = True
    # A Redis that takes longer than this to count a request is skipped for the retry period:
    # each process then enforces the limits alone (the degraded policy).
    rate_limit_timeout_seconds: float = Field(default=0.25, gt=0)
    rate_limit_retry_seconds: float = Field(default=5.0, gt=0)
    retry_after_seconds: int = Field(default=1, ge=1)
    page_size: int = Field(default=50, gt=0)
    max_page_size: int = Field(default=500, gt=0)

    # A claimed job whose lease ran out may be claimed again (its worker is presumed dead).
    job_lease_seconds: float = Field(default=300.0, gt=0)
    job_max_attempts: int = Field(default=3, gt=0)
    executor_threads: int = Field(default=1, gt=0)
    adapted_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    # Predictions of concurrent requests, for any adapted models, share forward passes: a batch
    # starts as soon as the previous one ends (no wait when idle) and, once started, collects
    # requests for at most this long or until it holds this many images. 0 images: no batching.
    predict_batch_wait_ms: float = Field(default=2.0, ge=0)
    predict_batch_max_images: int = Field(default=1024, ge=0)
    # Images per forward pass inside a batch (on a CPU ~32 small images cost the least each),
    # and threads running batches (None: one per CPU core).
    predict_batch_chunk: int = Field(default=32, gt=0)
    predict_batch_threads: int | None = Field(default=None, gt=0)
    # A prediction that would wait longer than this behind the line of this process (estimated
    # from the seconds an image has taken lately) is answered 503 predictions_busy with
    # Retry-After instead of joining it; 0: no bound. A request finding the line empty always runs.
    predict_max_wait_seconds: float = Field(default=10.0, ge=0)
    # A worker adapts up to this many waiting adapt jobs in one vmapped pass (1: one at a time);
    # when it finds a line it waits at most adapt_batch_wait_ms for the batch to fill.
    adapt_batch_max_jobs: int = Field(default=32, gt=0)
    adapt_batch_wait_ms: float = Field(default=0.0, ge=0)
    # Adapt jobs queued (not yet running) beyond which POST /v1/tasks answers 429 for the tenant
    # or 503 for everyone, with Retry-After, instead of growing the line.
    max_queued_adaptations: int = Field(default=512, gt=0)
    max_queued_adaptations_per_tenant: int = Field(default=128, gt=0)
    # None: "cuda" when torch sees a GPU, otherwise "cpu".
    device: str | None = None
    # Intra-op threads for torch in each thread that adapts or predicts; None: 1, because jobs and
    # predictions run on several threads whose thread teams otherwise contend for the cores (see
    # app.torch_threads). Meta-training uses this value too, or torch's default when None.
    torch_threads: int | None = Field(default=None, gt=0)
    task_time_limit_seconds: int = Field(default=600, gt=0)
    worker_metrics_port: int | None = None
    # Loopback by default: metrics are for the operator's scraper, not the world.
    worker_metrics_host: str = "127.0.0.1"

    # Timeouts, so a stopped or frozen dependency answers 503 instead of hanging a request.
    # PostgreSQL: opening a connection (libpq's minimum is 2 s), one statement (server side; the
    # client also gives up on a silent server 1 s after it), and waiting for a pooled connection.
    database_connect_timeout_seconds: int = Field(default=3, ge=2)
    database_statement_timeout_seconds: float = Field(default=15.0, gt=0)
    database_pool_timeout_seconds: float = Field(default=5.0, gt=0)
    # Redis: connecting and each command; a publish is tried twice before the request gets 503.
    broker_timeout_seconds: float = Field(default=3.0, gt=0)
    # Each /readyz check answers within this, or counts as failing.
    readiness_timeout_seconds: float = Field(default=2.0, gt=0)
    # Each worker marks the queues it consumes as served every this often (the mark lasts 3x).
    worker_heartbeat_seconds: float = Field(default=5.0, gt=0)

    # Admin meta-training (issue 4).
    # Upload cap for a dataset zip, and for what its members would unpack to.
    max_dataset_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    max_dataset_unpacked_bytes: int = Field(default=1024 * 1024 * 1024, gt=0)
    max_dataset_images: int = Field(default=200_000, gt=0)
    # The Omniglot background zip an admin may register by name; never a path from a request.
    omniglot_path: Path | None = None
    # A meta-training job renews its lease this often x3; a dead worker's run is picked up again
    # (and resumes from its checkpoint) once the lease has run out.
    train_lease_seconds: float = Field(default=120.0, gt=0)
    train_time_limit_seconds: int = Field(default=7 * 24 * 3600, gt=0)
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Settings:
        if self.environment == "production":
            if self.api_key_pepper.get_secret_value() == DEFAULT_KEY_PEPPER:
                raise ValueError("set MAML_SERVE_API_KEY_PEPPER to a secret value in production")
            if self.database_url is None:
                raise ValueError("set MAML_SERVE_DATABASE_URL in production")
        return self

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> Settings:
        if self.artifact_backend == "s3" and not self.s3_bucket:
            raise ValueError("MAML_SERVE_ARTIFACT_BACKEND=s3 needs MAML_SERVE_S3_BUCKET")
        return self

    @property
    def artifact_dir(self) -> Path:
        """Folder of the local backend: images, adapted weights, initializations, datasets."""
        return self.data_dir / "artifacts"

    @property
    def artifact_cache_dir(self) -> Path:
        """Folder of the S3 backend's verified local copies (bounded by artifact_cache_bytes)."""
        return self.data_dir / "artifact-cache"

    @property
    def work_dir(self) -> Path:
        """Folder of this host's work in progress (uploads being checked, meta-training runs)."""
        return self.data_dir / "work"

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL, defaulting to an SQLite file in data_dir."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'maml-serve.db').resolve()}"

    @property
    def pool_size(self) -> int:
        """Database connections per process: one for every thread that may use one."""
        return self.db_pool_size or self.api_threads + self.executor_threads + 4

    @property
    def is_embedded_database(self) -> bool:
        """True for SQLite, which the service creates and migrates itself."""
        return self.sqlalchemy_url.startswith("sqlite")

    @property
    def uses_celery(self) -> bool:
        """True when jobs are sent to Celery workers through the broker."""
        return self.broker_url is not None


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment, read once per process."""
    return Settings()
