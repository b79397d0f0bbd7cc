# A kdcache worker: leases shards from the service and runs the teacher on them (GPU or CPU).
#
#   docker build -f docker/worker.Dockerfile -t kdcache-worker .          (from the repo root)
#
# BASE_IMAGE: a CUDA PyTorch image by default; its torch is kept (the venv sees the base's site
# packages). For a CPU worker pass a plain Python base, e.g. --build-arg BASE_IMAGE=python:3.11-slim
# --build-arg PIP_OPTIONS="--extra-index-url https://download.pytorch.org/whl/cpu", and torch is
# installed from the wheels or the index. PIP_OPTIONS are added to every pip install; with wheels
# in docker/wheels/, "--no-index" builds with no network at all.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG PIP_OPTIONS=""
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/kdcache \
    PATH=/opt/kdcache/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    KDCACHE_GPU_LOCKS=/var/lib/kdcache/gpu-locks

COPY docker/requirements.py pyproject.toml /tmp/kdcache-build/
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    python3 -m venv --system-site-packages /opt/kdcache \
 && python3 /tmp/kdcache-build/requirements.py worker \
      < /tmp/kdcache-build/pyproject.toml > /tmp/kdcache-build/requirements.txt \
 && pip install $PIP_OPTIONS --find-links /wheels -r /tmp/kdcache-build/requirements.txt

COPY pyproject.toml README.md /tmp/kdcache-build/src/
COPY core /tmp/kdcache-build/src/core
COPY worker /tmp/kdcache-build/src/worker
COPY service /tmp/kdcache-build/src/service
COPY client /tmp/kdcache-build/src/client
COPY cli /tmp/kdcache-build/src/cli
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install $PIP_OPTIONS --find-links /wheels --no-deps /tmp/kdcache-build/src \
 && rm -rf /tmp/kdcache-build \
 && useradd --uid 10001 --shell /usr/sbin/nologin --home-dir /var/lib/kdcache --create-home kdcache \
 && mkdir -p "$KDCACHE_GPU_LOCKS" && chown kdcache "$KDCACHE_GPU_LOCKS" \
 && python -c "import kdcache.worker.lease, torch, transformers"

COPY docker/worker-entrypoint.sh /usr/local/bin/kdcache-worker
USER kdcache
WORKDIR /var/lib/kdcache
# KDCACHE_SERVER and KDCACHE_TOKEN come from the environment (see docs/deployment.md).
ENTRYPOINT ["kdcache-worker"]
