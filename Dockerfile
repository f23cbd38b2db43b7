# One image for the API, the Celery workers and the one-shot migration.
#   docker build -t maml-serve .                                # CPU torch
#   docker build --build-arg TORCH_VARIANT=cu128 -t maml-serve:gpu .  # CUDA torch (GPU workers)
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
# "cpu" for CPU-only images; a CUDA variant (e.g. "cu128") for GPU workers.
ARG TORCH_VARIANT=cpu

# MALLOC_ARENA_MAX: with MAML_SERVE_ALLOCATOR=system, glibc's per-thread arenas let a long-running
# API (40 request threads, tensors allocated and freed in each) creep ~15 KB per task; two arenas
# kept it flat (README, Performance).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MAML_SERVE_DATA_DIR=/data

WORKDIR /src

# jemalloc: `maml-serve serve` and `worker` restart themselves once with it preloaded, decay off
# (MAML_SERVE_ALLOCATOR=auto, app/core/allocator.py): torch's short-lived buffers then cost
# less CPU than with glibc's malloc (README, Performance).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*

# torch first, from its own index, so the resolver never swaps in another build.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"

# Dependencies in their own layer: code changes do not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# A regular install, as from a wheel: the migrations, the shipped initialization and the
# console travel inside the packages, so no source tree is kept in the image.
COPY README.md ./
COPY migrations ./migrations
COPY fewshot ./fewshot
COPY app ./app
COPY worker ./worker
COPY maml_serve ./maml_serve
RUN pip install --no-deps . \
    && cd / && rm -rf /src \
    && useradd --create-home --uid 10001 maml \
    && mkdir -p /data \
    && chown maml /data

WORKDIR /home/maml
USER maml
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
CMD ["maml-serve", "serve", "--host", "0.0.0.0", "--port", "8000"]
