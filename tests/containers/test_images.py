"""The container images, run for real with podman: the gateway path entirely in containers on a
podman network (Envoy, llmd-scheduler, two llmd-sim engines) serving a request through the
published port, and every image's --help, health check, user and labels.

`make images` builds the images first; a missing one is built here (minutes on a machine that
has none yet)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from llmd.dev.envoy import EnvoySettings, envoy_config
from llmd.dev.images import (
    BASE_IMAGE,
    DEFAULT_IMAGES,
    IMAGES,
    build,
    podman,
    podman_env,
    repo_root,
    tag,
)
from llmd.vllm_cpu.server import free_port

pytestmark = pytest.mark.containers

SERVICES = (
    "llmd-scheduler",
    "llmd-indexer",
    "llmd-autoscaler",
    "llmd-activator",
    "llmd-sidecar",
    "llmd-sim",
    "llmd-fs-evictor",
)


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    root = repo_root()
    tags = {img.name: tag(img, root) for img in DEFAULT_IMAGES}
    missing = [
        img
        for img in DEFAULT_IMAGES
        if subprocess.run(
            ["podman", "image", "exists", tags[img.name]], env=podman_env(), check=False
        ).returncode
    ]
    if missing:
        build(missing, root=root)
    return tags


class Containers:
    """Containers and a network created by one test, all removed at the end."""

    def __init__(self) -> None:
        self.run_id = uuid.uuid4().hex[:8]
        self.names: list[str] = []
        self.network = f"llmd-test-{self.run_id}"
        podman("network", "create", self.network)

    def start(self, name: str, image: str, *args: str, options: tuple[str, ...] = ()) -> str:
        full = f"{name}-{self.run_id}"
        self.names.append(full)
        podman("run", "-d", "--name", full, "--network", self.network, *options, image, *args)
        return full

    def ip(self, name: str) -> str:
        fmt = f'{{{{(index .NetworkSettings.Networks "{self.network}").IPAddress}}}}'
        return podman("inspect", "--format", fmt, name)

    def logs(self, name: str) -> str:
        return podman("logs", "--tail", "40", name, check=False)

    def healthy(self, name: str, timeout: float = 60.0) -> None:
        """Run the image's own HEALTHCHECK until it passes."""
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run(
                ["podman", "healthcheck", "run", name],
                env=podman_env(),
                capture_output=True,
                text=True,
                check=False,
            )
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{name} never healthy: {r.stdout}{r.stderr}\n{self.logs(name)}"
                )
            time.sleep(1.0)

    def close(self) -> None:
        for name in reversed(self.names):
            podman("rm", "-f", "-t", "2", name, check=False)
        podman("network", "rm", "-f", self.network, check=False)


@pytest.fixture
def containers() -> Iterator[Containers]:
    c = Containers()
    try:
        yield c
    finally:
        c.close()


def test_the_gateway_path_serves_a_request_entirely_in_containers(
    images: dict[str, str], containers: Containers, tmp_path: Path
) -> None:
    sim_args = ("--host", "0.0.0.0", "--port", "8000", "--enable-prompt-tokens-details")
    engines = [
        containers.start(f"sim-{x}", images["llmd-sim"], *sim_args, "--pod-name", f"sim-{x}")
        for x in "ab"
    ]
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text(
        yaml.safe_dump(
            {
                "endpoints": [
                    {"name": e, "address": containers.ip(e), "port": "8000"} for e in engines
                ]
            }
        )
    )
    endpoints.chmod(0o644)
    sched = containers.start(
        "scheduler",
        images["llmd-scheduler"],
        "--endpoints-file", "/etc/llmd/endpoints.yaml",
        options=("-v", f"{endpoints}:/etc/llmd/endpoints.yaml:ro"),
    )  # fmt: skip
    config = tmp_path / "envoy.yaml"
    settings = EnvoySettings(listen_port=8081, extproc_host=sched, extproc_port=9002)
    config.write_text(yaml.safe_dump(envoy_config(settings), sort_keys=False))
    config.chmod(0o644)
    port = free_port()
    gateway = containers.start(
        "gateway",
        images["llmd-gateway"],
        options=("-v", f"{config}:/etc/envoy/envoy.yaml:ro", "-p", f"127.0.0.1:{port}:8081"),
    )
    for name in (*engines, sched, gateway):
        containers.healthy(name)
    body = {"model": "tiny", "prompt": "hello from a container " * 8, "max_tokens": 5}
    deadline = time.monotonic() + 60
    while True:  # Envoy needs its first health check of the scheduler
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, f"{r.text}\n{containers.logs(sched)}\n{containers.logs(gateway)}"
    assert r.json()["usage"]["completion_tokens"] == 5
    for _ in range(3):
        again = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30)
        assert again.status_code == 200, again.text
    metrics = podman(
        "exec", sched, "python3", "-c",
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9090/metrics').read().decode())",
    )  # fmt: skip
    served = [
        line
        for line in metrics.splitlines()
        if line.startswith(("llm_d_epp_request_total", "inference_objective_request_total"))
    ]
    assert served, metrics[:2000]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in served) >= 4, served


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_image_answers_help_and_runs_as_a_non_root_user(
    images: dict[str, str], name: str
) -> None:
    out = podman("run", "--rm", images[name], "--help")
    assert out.startswith(f"usage: {name}"), out[:300]
    doc = json.loads(podman("image", "inspect", images[name]))[0]
    config = doc["Config"]
    assert config["User"] == "10001:10001"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == name
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert len(labels["org.opencontainers.image.revision"]) in (40, len("unknown"))
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert doc["Healthcheck"]["Test"][0] == "CMD", doc["Healthcheck"]


def test_each_service_image_passes_its_own_health_check(
    images: dict[str, str], containers: Containers, tmp_path: Path
) -> None:
    """Started without a cluster (a static pool, the local control API left unreachable),
    every service is alive by its image's HEALTHCHECK."""
    variants = tmp_path / "variants.yaml"
    variants.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "llmd.ai/v1alpha1",
                "kind": "VariantAutoscaling",
                "metadata": {"name": "v"},
                "spec": {"modelID": "tiny", "scaleTargetRef": {"name": "sim"}},
            }
        )
    )
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("endpoints: []\n")
    for f in (variants, endpoints):
        f.chmod(0o644)
    mounts = (
        "-v", f"{variants}:/etc/llmd/variants.yaml:ro",
        "-v", f"{endpoints}:/etc/llmd/endpoints.yaml:ro",
    )  # fmt: skip
    started = [
        containers.start("sim", images["llmd-sim"]),
        containers.start(
            "indexer", images["llmd-indexer"],
            "--endpoints-file", "/etc/llmd/endpoints.yaml", "--render-url", "http://127.0.0.1:9",
            options=mounts,
        ),
        containers.start(
            "autoscaler", images["llmd-autoscaler"],
            "--variants-file", "/etc/llmd/variants.yaml", "--control-url", "http://127.0.0.1:9",
            options=mounts,
        ),
        containers.start(
            "activator", images["llmd-activator"],
            "--pool", "sim", "--control-url", "http://127.0.0.1:9",
        ),
        containers.start("sidecar", images["llmd-sidecar"]),  # its decoder is not there: fine
        containers.start("evictor", images["llmd-fs-evictor"], "--root", "/tmp"),
    ]  # fmt: skip
    for name in started:
        containers.healthy(name)
        state = json.loads(podman("inspect", name))[0]["State"]
        assert state["Running"] is True, containers.logs(name)


STANDIN = """\
FROM {base}
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
"""


def test_the_model_server_recipe_installs_the_plugin_into_the_bases_python(
    images: dict[str, str], tmp_path: Path
) -> None:
    """vLLM's image cannot be fetched here: the recipe is built on a stand-in with a Python on
    PATH as vLLM's image has, and the plugin must import there, at the package's version,
    under the image's user, with vLLM's server as the entrypoint."""
    (model_server,) = [i for i in IMAGES if i.name == "llmd-model-server"]
    standin, check = "localhost/llmd-vllm-standin:test", "localhost/llmd-model-server-check:test"
    (tmp_path / "Dockerfile").write_text(STANDIN.format(base=BASE_IMAGE))
    podman("build", "--quiet", "--tag", standin, str(tmp_path))
    try:
        build(
            [model_server],
            root=repo_root(),
            vendor_base=standin,
            tags_override={model_server.name: check},
        )
        version = podman(
            "run", "--rm", "--entrypoint", "python3", check, "-c",
            "import importlib.metadata as m, llmd.fs_offload.engine, llmd.fs_offload.settings;"
            " print(m.version('llmd-fs-offload'))",
        )  # fmt: skip
        assert version == "0.1.0"
        config = json.loads(podman("image", "inspect", check))[0]["Config"]
        assert config["User"] == "10001:10001"
        assert config["Entrypoint"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
        assert config["Labels"]["org.opencontainers.image.title"] == "llmd-model-server"
        assert "HOME=/cache" in config["Env"]
    finally:
        podman("rmi", "--force", check, standin, check=False)
