# The kdcache service: REST API, leases, and the caches served over HTTP. No torch in this image.
#
#   docker build -f docker/service.Dockerfile -t kdcache-service .        (from the repo root)
#
# BASE_IMAGE: any image with python3 >= 3.10 and its venv module (python:3.11-slim, or a local
# Debian image with python3-venv for offline builds). PIP_OPTIONS are added to every pip install;
# with wheels in docker/wheels/, "--no-index" builds with no network at all.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG PIP_OPTIONS=""
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/kdcache \
    PATH=/opt/kdcache/bin:$PATH

COPY docker/requirements.py pyproject.toml /tmp/kdcache-build/
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    python3 -m venv /opt/kdcache \
 && python3 /tmp/kdcache-build/requirements.py service \
      < /tmp/kdcache-build/pyproject.toml > /tmp/kdcache-build/requirements.txt \
 && pip install $PIP_OPTIONS --find-links /wheels -r /tmp/kdcache-build/requirements.txt

COPY pyproject.toml README.md /tmp/kdcache-build/src/
COPY core /tmp/kdcache-build/src/core
COPY worker /tmp/kdcache-build/src/worker
COPY service /tmp/kdcache-build/src/service
COPY client /tmp/kdcache-build/src/client
COPY cli /tmp/kdcache-build/src/cli
# --no-deps: kdcache's own dependency list includes torch, which the service never imports.
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install $PIP_OPTIONS --find-links /wheels --no-deps /tmp/kdcache-build/src \
 && rm -rf /tmp/kdcache-build \
 && useradd --uid 10001 --shell /usr/sbin/nologin --home-dir /var/lib/kdcache --create-home kdcache \
 && python -c "import kdcache.service" \
 && ! python -c "import torch" 2>/dev/null

USER kdcache
WORKDIR /var/lib/kdcache
EXPOSE 8080
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# KDCACHE_ROOT, KDCACHE_DB_URL and the tokens come from the environment (see docs/deployment.md).
CMD ["sh", "-c", "exec kdcache serve --root \"$KDCACHE_ROOT\" --host 0.0.0.0 --port 8080"]
