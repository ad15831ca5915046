# llmd-model-server: vLLM's own image with the llmd.fs_offload plugin installed (the shared-
# filesystem KV tier, LlmdFsConnector), so model-server pods need no init container to copy it.
# The plugin is pure Python and imports only the standard library, torch and vllm (all in the
# base), and xxhash when checksum xxh3 is chosen. BASE_IMAGE must be a vLLM 0.32 image.
# Built by `llmd-dev images build llmd-model-server` (not by `make images`: vLLM's image is
# fetched from its registry), which puts the llmd-fs-offload wheel in dist/llmd-model-server/.
ARG BASE_IMAGE=docker.io/vllm/vllm-openai:v0.32.0

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="llmd-model-server" \
      org.opencontainers.image.description="vLLM with llmd's FS KV tier plugin (llmd-fs-offload)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/llmd/llmd" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY dist/llmd-model-server/ /tmp/llmd-dist/
# Only the plugin (--no-deps): the wheel's other dependencies serve the evictor, not vLLM.
# The import at the end fails the build on a base whose Python cannot load it.
RUN python3 -m pip install --no-cache-dir --no-deps /tmp/llmd-dist/*.whl \
 && rm -rf /tmp/llmd-dist \
 && python3 -c "import llmd.fs_offload.engine, llmd.fs_offload.settings"
# vLLM writes its caches under HOME: mount a volume there (the chart mounts /cache)
ENV HOME=/cache \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8000 5557
HEALTHCHECK --interval=30s --timeout=5s --start-period=1800s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
