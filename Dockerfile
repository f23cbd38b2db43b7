# One image for the API, the Celery workers and the one-shot migration.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
# "cpu" for CPU-only images; e.g. "cu124" builds a GPU worker image.
ARG TORCH_VARIANT=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MAML_SERVE_DATA_DIR=/data

WORKDIR /app

# torch first, from its own index, so the resolver never swaps in another build.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"

# Dependencies in their own layer: code changes do not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY README.md alembic.ini ./
COPY migrations ./migrations
COPY fewshot ./fewshot
COPY app ./app
COPY worker ./worker
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 10001 maml \
    && mkdir -p /data \
    && chown maml /data

USER maml
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
CMD ["maml-serve", "serve", "--host", "0.0.0.0", "--port", "8000"]
