# llmd-fs-evictor: keeps a shared KV volume written by llmd-fs-offload between its watermarks.
# It also carries the llmd.fs_offload vLLM plugin (pure Python) for an init container to copy
# into vLLM pods.
# Built by `make images` (llmd-dev images build), which prepares the build context:
# requirements/llmd-fs-evictor.txt (third-party packages pinned from uv.lock, with hashes), wheels/
# (those packages) and dist/llmd-fs-evictor/ (the llmd packages). Nothing is fetched during the build.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
COPY requirements/llmd-fs-evictor.txt /build/requirements.txt
COPY wheels/ /build/wheels/
COPY dist/llmd-fs-evictor/ /build/dist/
RUN python3 -m venv /opt/llmd \
 && /opt/llmd/bin/pip install --no-cache-dir --no-index --find-links /build/wheels \
      --require-hashes -r /build/requirements.txt \
 && /opt/llmd/bin/pip install --no-cache-dir --no-index --no-deps /build/dist/*.whl \
 && find /opt/llmd -name __pycache__ -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="llmd-fs-evictor" \
      org.opencontainers.image.description="evictor for a shared KV volume, and the llmd.fs_offload vLLM plugin" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/llmd/llmd" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/llmd /opt/llmd
# The vLLM plugin on its own, for an init container that copies it into vLLM's PYTHONPATH:
# /opt/llmd-plugin/llmd/fs_offload (imports only the standard library, torch, vllm; xxhash if
# checksum xxh3 is chosen).
RUN mkdir -p /opt/llmd-plugin/llmd \
 && cp -r "$(/opt/llmd/bin/python3 -c 'import llmd.fs_offload, os; print(os.path.dirname(llmd.fs_offload.__file__))')" /opt/llmd-plugin/llmd/
ENV PATH=/opt/llmd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080 5557
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["llmd-fs-evictor"]
