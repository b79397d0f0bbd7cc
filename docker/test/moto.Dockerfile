# Test stand-in for MinIO: moto's S3 server, built offline from a local base and the wheelhouse.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG PIP_OPTIONS=""
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PATH=/opt/moto/bin:$PATH
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    python3 -m venv /opt/moto \
 && pip install $PIP_OPTIONS --find-links /wheels "moto[s3]" flask flask-cors
EXPOSE 9000
CMD ["moto_server", "-H", "0.0.0.0", "-p", "9000"]
