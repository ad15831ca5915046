# llmd-sim: simulated vLLM 0.32 servers for tests and benchmarks without GPUs
# Built by `make images` (llmd-dev images build), which prepares the build context:
# requirements/llmd-sim.txt (third-party packages pinned from uv.lock, with hashes), wheels/
# (those packages) and dist/llmd-sim/ (the llmd packages). Nothing is fetched during the build.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
COPY requirements/llmd-sim.txt /build/requirements.txt
COPY wheels/ /build/wheels/
COPY dist/llmd-sim/ /build/dist/
RUN python3 -m venv /opt/llmd \
 && /opt/llmd/bin/pip install --no-cache-dir --no-index --find-links /build/wheels \
      --require-hashes -r /build/requirements.txt \
 && /opt/llmd/bin/pip install --no-cache-dir --no-index --no-deps /build/dist/*.whl \
 && LLMD_CACHE_DIR=/opt/llmd/cache /opt/llmd/bin/python -c \
      "from llmd.sim.tokenizer import default_tokenizer_dir; default_tokenizer_dir()" \
 && find /opt/llmd -name __pycache__ -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="llmd-sim" \
      org.opencontainers.image.description="simulated vLLM 0.32 servers for tests and benchmarks without GPUs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/llmd/llmd" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/llmd /opt/llmd
# the default tokenizer, generated at build time (the root filesystem may be read-only)
ENV PATH=/opt/llmd/bin:$PATH \
    LLMD_CACHE_DIR=/opt/llmd/cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8000 5557
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["llmd-sim"]
# listen on every interface (llmd-sim binds loopback by default); arguments given to
# `podman run` replace these, so pass --host 0.0.0.0 with them
CMD ["--host", "0.0.0.0"]
