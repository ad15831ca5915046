# llmd-sidecar: the P/D proxy beside vLLM on decode pods (llm-d pd-sidecar compatible)
# Built by `make images` (llmd-dev images build), which prepares the build context:
# requirements/llmd-sidecar.txt (third-party packages pinned from uv.lock, with hashes), wheels/
# (those packages) and dist/llmd-sidecar/ (the llmd packages). Nothing is fetched during the build.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
COPY requirements/llmd-sidecar.txt /build/requirements.txt
COPY wheels/ /build/wheels/
COPY dist/llmd-sidecar/ /build/dist/
RUN python3 -m venv /opt/llmd \
 && /opt/llmd/bin/pip install --no-cache-dir --no-index --find-links /build/wheels \
      --require-hashes -r /build/requirements.txt \
 && /opt/llmd/bin/pip install --no-cache-dir --no-index --no-deps /build/dist/*.whl \
 && find /opt/llmd -name __pycache__ -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="llmd-sidecar" \
      org.opencontainers.image.description="the P/D proxy beside vLLM on decode pods (llm-d pd-sidecar compatible)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/llmd/llmd" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/llmd /opt/llmd
ENV PATH=/opt/llmd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8000 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["llmd-sidecar"]
