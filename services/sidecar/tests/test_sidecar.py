"""llmd-sidecar on real processes: a prefill and a decode `llmd-sim` engine with vLLM 0.32's
NixlConnector contract (the decode engine pulls the prefill's blocks over its side channel),
the sidecar in front of the decode engine."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmd.dev.sim_engines import SimFleetProcess, free_run
from llmd.sidecar.app import SidecarApp, SidecarConfig
from llmd.vllm_cpu.server import free_port

pytestmark = pytest.mark.integration

PROMPT = "the quick brown fox jumps over the lazy dog " * 20


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("pd")
    prefill = SimFleetProcess.start_pd("kv_producer", tmp)
    decode = SimFleetProcess.start_pd("kv_consumer", tmp)
    try:
        yield prefill.engines[0].url, decode.engines[0].url
    finally:
        prefill.stop()
        decode.stop()


async def _sidecar(decode_url: str, **settings: Any) -> SidecarApp:
    port = int(decode_url.rsplit(":", 1)[1])
    config = SidecarConfig(
        host="127.0.0.1", port=free_port(), model_server_port=port, metrics_port=free_port(),
        **settings,
    )  # fmt: skip
    app = SidecarApp(config)
    await app.start()
    return app


@pytest.fixture
async def sidecar(engines: tuple[str, str]) -> AsyncIterator[SidecarApp]:
    app = await _sidecar(engines[1])
    yield app
    await app.stop()


def url(app: SidecarApp) -> str:
    return f"http://127.0.0.1:{app.config.port}"


def metric(app: SidecarApp, name: str, **labels: str) -> float:
    return app.registry.get_sample_value(name, labels) or 0.0


async def engine_counter(engine: str, name: str) -> float:
    async with httpx.AsyncClient() as c:
        text = (await c.get(f"{engine}/metrics")).text
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(name))


async def test_a_request_is_prefilled_remotely_and_decoded_locally(
    sidecar: SidecarApp, engines: tuple[str, str]
) -> None:
    prefill, decode = engines
    prefill_host = prefill.removeprefix("http://")
    before = await engine_counter(prefill, "vllm:generation_tokens_total")
    pulls = await engine_counter(decode, "vllm:nixl_xfer_time_seconds_count")
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12}
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.post(
            f"{url(sidecar)}/v1/completions", json=body,
            headers={"x-prefiller-host-port": f"http://{prefill_host}, 10.255.0.1:1"},
        )  # fmt: skip
        state = (await c.get(f"{prefill}/sim/state")).json()
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["usage"]["completion_tokens"] == 12
    # the decode engine pulled the prefill's blocks (one NIXL transfer; the prefill's lease on
    # them is gone) and reports the prefill's own cache hits as cached, as vLLM 0.32 does
    assert await engine_counter(decode, "vllm:nixl_xfer_time_seconds_count") - pulls == 1
    assert state["leases"] == 0
    assert doc["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # a cold prefill
    # the prefill engine generated one token for this request, no more
    assert await engine_counter(prefill, "vllm:generation_tokens_total") - before == 1
    assert metric(sidecar, "llmd_sidecar_requests_total", mode="pd", outcome="2xx") == 1
    assert metric(sidecar, "llmd_sidecar_true_ttft_seconds_count") == 1
    assert metric(sidecar, "llmd_sidecar_missing_kv_transfer_params_total") == 0


async def test_a_streamed_chat_is_streamed_back(
    sidecar: SidecarApp, engines: tuple[str, str]
) -> None:
    prefill_host = engines[0].removeprefix("http://")
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = []
    async with httpx.AsyncClient(timeout=30) as c, c.stream(
        "POST", f"{url(sidecar)}/v1/chat/completions", json=body,
        headers={"x-prefiller-host-port": prefill_host},
    ) as r:  # fmt: skip
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    usage = [json.loads(e)["usage"] for e in events[:-1] if json.loads(e).get("usage")]
    assert usage[-1]["completion_tokens"] == 8


async def test_without_the_header_it_is_the_local_engine_and_other_routes_pass_through(
    sidecar: SidecarApp,
) -> None:
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.post(f"{url(sidecar)}/v1/completions",
                         json={"model": "tiny", "prompt": "hi", "max_tokens": 3})  # fmt: skip
        assert r.status_code == 200
        assert r.json()["usage"]["completion_tokens"] == 3
        models = await c.get(f"{url(sidecar)}/v1/models")
        assert models.json()["data"][0]["id"] == "tiny"
        assert (await c.get(f"{url(sidecar)}/health")).status_code == 200
        bad = await c.post(f"{url(sidecar)}/v1/completions", content=b"{nope",
                           headers={"x-prefiller-host-port": "127.0.0.1:1",
                                    "content-type": "application/json"})  # fmt: skip
    assert bad.status_code == 400
    assert bad.json()["object"] == "error"
    assert bad.json()["param"] == ""
    assert metric(sidecar, "llmd_sidecar_requests_total", mode="decode-only", outcome="2xx") == 1
    assert metric(sidecar, "llmd_sidecar_requests_total", mode="passthrough", outcome="2xx") == 1
    # the decode-leg histogram holds the decode-only request, not the proxied /v1/models call
    assert metric(sidecar, "llmd_sidecar_decode_duration_seconds_count") == 1


async def test_ssrf_protection_refuses_hosts_outside_the_allowlist(
    engines: tuple[str, str],
) -> None:
    app = await _sidecar(
        engines[1], enable_ssrf_protection=True, allowed_prefill_hosts=["10.1.2.3"]
    )
    try:
        async with httpx.AsyncClient(timeout=30) as c:
            r = await c.post(
                f"{url(app)}/v1/completions", json={"model": "tiny", "prompt": "x"},
                headers={"x-prefiller-host-port": engines[0].removeprefix("http://")},
            )  # fmt: skip
        assert r.status_code == 403
        assert r.text == "Forbidden: prefill target not allowed by SSRF protection"
        assert metric(app, "llmd_sidecar_ssrf_refused_total") == 1
    finally:
        await app.stop()


async def test_a_dead_prefill_pod_is_retried_then_answered_with_a_502(
    engines: tuple[str, str],
) -> None:
    app = await _sidecar(engines[1], prefill_max_retries=2, prefill_retry_backoff=0.05)
    dead = f"127.0.0.1:{free_port()}"
    try:
        async with httpx.AsyncClient(timeout=30) as c:
            r = await c.post(
                f"{url(app)}/v1/completions", json={"model": "tiny", "prompt": "x"},
                headers={"x-prefiller-host-port": dead},
            )  # fmt: skip
        assert r.status_code == 502
        assert "the prefill leg" in r.json()["message"]
        assert metric(app, "llmd_sidecar_prefill_retries_total") == 2
        assert metric(app, "llmd_sidecar_requests_total", mode="pd", outcome="prefill-error") == 1
    finally:
        await app.stop()


async def test_a_prefill_error_is_relayed_verbatim(
    sidecar: SidecarApp, engines: tuple[str, str]
) -> None:
    async with httpx.AsyncClient(timeout=30) as c:
        direct = await c.post(f"{engines[0]}/v1/completions", json={"model": "nope", "prompt": "x"})
        r = await c.post(
            f"{url(sidecar)}/v1/completions", json={"model": "nope", "prompt": "x"},
            headers={"x-prefiller-host-port": engines[0].removeprefix("http://")},
        )  # fmt: skip
    assert direct.status_code == r.status_code == 404
    assert r.json()["error"]["message"] == direct.json()["error"]["message"]


async def test_a_decoder_that_is_not_running_is_a_503() -> None:
    app = await _sidecar(f"http://127.0.0.1:{free_port()}")
    try:
        async with httpx.AsyncClient(timeout=30) as c:
            r = await c.post(f"{url(app)}/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 503
        assert r.json()["type"] == "ServiceUnavailable"
        assert "decode node is not ready" in r.json()["message"]
    finally:
        await app.stop()


async def test_a_hung_prefill_pod_is_a_504_after_the_prefill_timeout(
    engines: tuple[str, str],
) -> None:
    """llm-d's sidecar waits on a hung prefill pod as long as the client does; here the
    prefill leg has a deadline."""
    app = await _sidecar(engines[1], prefill_timeout=0.5)
    with socket.socket() as hung:  # accepts connections (the kernel does) and never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        target = f"127.0.0.1:{hung.getsockname()[1]}"
        try:
            async with httpx.AsyncClient(timeout=30) as c:
                r = await c.post(
                    f"{url(app)}/v1/completions", json={"model": "tiny", "prompt": "x"},
                    headers={"x-prefiller-host-port": target},
                )  # fmt: skip
            assert r.status_code == 504
            assert r.json()["type"] == "GatewayTimeoutError"
            assert "took over 0.5s" in r.json()["message"]
        finally:
            await app.stop()


async def test_ssrf_protection_follows_the_inference_pools_pods(engines: tuple[str, str]) -> None:
    """--inference-pool: the allowlist is the pool's pods (read through the official client
    from a loopback API server), kept current as pods come and go."""
    from kubernetes import client

    from llmd.dev.fakekube import FakeKube, pod

    kube = FakeKube().start()
    kube.custom["inferencepools"] = {
        "llm/chat": {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": "chat", "namespace": "llm"},
            "spec": {
                "selector": {"matchLabels": {"app": "vllm"}},
                "targetPorts": [{"number": 8000}],
            },
        }
    }
    kube.apply("ADDED", pod("prefill-0", "127.0.0.1", labels={"app": "vllm"}))
    port = int(engines[1].rsplit(":", 1)[1])
    config = SidecarConfig(
        host="127.0.0.1", port=free_port(), model_server_port=port, metrics_port=free_port(),
        enable_ssrf_protection=True, inference_pool="llm/chat",
    )  # fmt: skip
    app = SidecarApp(config)
    app.custom_api = client.CustomObjectsApi(client.ApiClient(client.Configuration(host=kube.url)))
    await app.start()
    try:
        for _ in range(100):
            if "127.0.0.1" in app.allowed:
                break
            await asyncio.sleep(0.05)
        assert app.allowed == {"127.0.0.1", "prefill-0"}
        async with httpx.AsyncClient(timeout=30) as c:
            ready = await c.get(f"http://127.0.0.1:{config.metrics_port}/readyz")
            assert ready.status_code == 200
            body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}
            ok = await c.post(f"{url(app)}/v1/completions", json=body,
                              headers={"x-prefiller-host-port": engines[0].removeprefix("http://")})  # fmt: skip
            assert ok.status_code == 200, ok.text
            kube.apply("DELETED", pod("prefill-0", "127.0.0.1", labels={"app": "vllm"}))
            for _ in range(100):
                if not app.allowed:
                    break
                await asyncio.sleep(0.05)
            refused = await c.post(f"{url(app)}/v1/completions", json=body,
                                   headers={"x-prefiller-host-port": engines[0].removeprefix("http://")})  # fmt: skip
            assert refused.status_code == 403
    finally:
        await app.stop()
        kube.stop()


def test_a_pool_without_a_selector_or_an_unknown_group_is_refused() -> None:
    from llmd.sidecar.allowlist import parse_pool, pool_selector

    assert parse_pool("chat") == ("default", "chat")
    assert parse_pool("llm/chat") == ("llm", "chat")
    assert pool_selector({"spec": {"selector": {"app": "x", "tier": "gpu"}}}) == "app=x,tier=gpu"
    with pytest.raises(ValueError, match=r"no spec\.selector"):
        pool_selector({"spec": {}})
    with pytest.raises(ValueError, match="pool_group"):
        SidecarConfig(enable_ssrf_protection=True, inference_pool="p", pool_group="example.com")
    with pytest.raises(ValueError, match="needs inference_pool or allowed_prefill_hosts"):
        SidecarConfig(enable_ssrf_protection=True)


def _self_signed(directory: Path, cn: str = "localhost") -> Path:
    """tls.crt/tls.key for localhost and 127.0.0.1 in `directory` (made with openssl)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", f"/CN={cn}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(directory / "tls.key"), "-out", str(directory / "tls.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    return directory


def _served_cn(port: int) -> str:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    pem = ssl.DER_cert_to_PEM_cert(der)
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-subject"], input=pem, capture_output=True, text=True
    )
    return out.stdout.strip().rsplit("=", 1)[-1].strip()


async def test_https_on_both_legs_and_a_rotated_certificate(
    engines: tuple[str, str], tmp_path: Path
) -> None:
    """The decode sidecar serves HTTPS and reaches the prefill pod over HTTPS (there another
    sidecar terminates TLS in front of the prefill engine); an unverifiable prefill certificate
    is a 502 that says so; a new certificate in --cert-path is served without a restart."""
    prefill, decode = engines
    certs = _self_signed(tmp_path / "certs", "first")
    front = await _sidecar(prefill, secure_proxy=True, cert_path=str(certs))
    strict = await _sidecar(decode, secure_proxy=True, cert_path=str(certs), enable_tls="prefiller")
    lenient = await _sidecar(
        decode,
        secure_proxy=True,
        cert_path=str(certs),
        enable_tls=["prefiller"],
        tls_insecure_skip_verify=["prefiller"],
    )
    try:
        before = await engine_counter(prefill, "vllm:generation_tokens_total")
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8}
        header = {"x-prefiller-host-port": f"127.0.0.1:{front.config.port}"}
        async with httpx.AsyncClient(
            timeout=30, verify=ssl.create_default_context(cafile=certs / "tls.crt")
        ) as c:
            r = await c.post(
                f"https://localhost:{lenient.config.port}/v1/completions", json=body, headers=header
            )
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"]
            assert await engine_counter(prefill, "vllm:generation_tokens_total") == before + 1
            refused = await c.post(
                f"https://localhost:{strict.config.port}/v1/completions", json=body, headers=header
            )
            assert refused.status_code == 502
            assert "CERTIFICATE_VERIFY_FAILED" in refused.json()["message"]
        with pytest.raises(httpx.HTTPError):  # plaintext to the HTTPS port
            async with httpx.AsyncClient(timeout=5) as c:
                await c.get(f"http://127.0.0.1:{lenient.config.port}/health")
        assert await asyncio.to_thread(_served_cn, lenient.config.port) == "first"
        _self_signed(certs, "second")
        assert lenient.tls is not None
        assert lenient.ssl_context is not None
        assert lenient.tls.refresh(lenient.ssl_context)
        assert await asyncio.to_thread(_served_cn, lenient.config.port) == "second"
        assert not lenient.tls.refresh(lenient.ssl_context), "unchanged files: nothing to do"
        # a key that does not match its certificate: refused, the served pair stays
        other = _self_signed(tmp_path / "other", "third")
        (certs / "tls.key").write_bytes((other / "tls.key").read_bytes())
        assert not lenient.tls.refresh(lenient.ssl_context)
        assert await asyncio.to_thread(_served_cn, lenient.config.port) == "second"
    finally:
        for app in (front, strict, lenient):
            await app.stop()


def test_https_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="secure_proxy needs cert_path"):
        SidecarConfig(secure_proxy=True)
    assert SidecarConfig(enable_tls="prefiller,encoder").enable_tls == ["encoder", "prefiller"]
    with pytest.raises(ValueError, match="ec_connector"):
        SidecarConfig(ec_connector="ec-mooncake")
    with pytest.raises(ValueError, match="unknown stage 'decode'"):
        SidecarConfig(tls_insecure_skip_verify=["decode"])
    assert SidecarConfig(enable_tls="decoder,prefiller").enable_tls == ["decoder", "prefiller"]


async def test_data_parallel_ranks_each_get_a_listener_and_rank_0_follows_the_header(
    engines: tuple[str, str], tmp_path: Path
) -> None:
    """Two decode engines on consecutive ports stand for two vLLM data-parallel ranks; the
    sidecar listens on two consecutive ports. Through rank 0, x-data-parallel-host-port picks
    the engine (the P/D leg too); rank 1's listener serves rank 1's engine."""
    transfer = {"kv_connector": "NixlConnector", "kv_role": "kv_consumer"}
    fleet = SimFleetProcess.start(
        count=2, block_size=16, profile="h100-8b", work=tmp_path,
        extra_args=["--kv-transfer-config", json.dumps(transfer)],
    )  # fmt: skip
    rank0, rank1 = (e.url for e in fleet.engines)
    model_port = int(rank0.rsplit(":", 1)[1])
    assert int(rank1.rsplit(":", 1)[1]) == model_port + 1
    port = free_run(2)
    app = SidecarApp(
        SidecarConfig(
            host="127.0.0.1",
            port=port,
            model_server_port=model_port,
            metrics_port=free_port(),
            data_parallel_size=2,
        )
    )
    await app.start()
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4}
    served = "vllm:request_success_total"
    try:
        before = [await engine_counter(e, served) for e in (rank0, rank1)]
        pulls = await engine_counter(rank1, "vllm:nixl_xfer_time_seconds_count")
        async with httpx.AsyncClient(timeout=30) as c:
            pd = await c.post(
                f"http://127.0.0.1:{port}/v1/completions", json=body,
                headers={"x-data-parallel-host-port": f"127.0.0.1:{port + 1}",
                         "x-prefiller-host-port": engines[0].removeprefix("http://")},
            )  # fmt: skip
            direct = await c.post(f"http://127.0.0.1:{port + 1}/v1/completions", json=body)
            plain = await c.post(f"http://127.0.0.1:{port}/v1/completions", json=body)
            wrong = await c.post(
                f"http://127.0.0.1:{port}/v1/completions", json=body,
                headers={"x-data-parallel-host-port": f"127.0.0.1:{port + 2}"},
            )  # fmt: skip
            app.pod_ip = "10.9.9.9"  # the header must name this pod's own address
            elsewhere = await c.get(
                f"http://127.0.0.1:{port}/v1/models",
                headers={"x-data-parallel-host-port": f"127.0.0.1:{port + 1}"},
            )  # fmt: skip
        after = [await engine_counter(e, served) for e in (rank0, rank1)]
        assert pd.status_code == direct.status_code == plain.status_code == 200, pd.text
        assert pd.json()["usage"]["completion_tokens"] == 4
        # rank 1's engine served the P/D request (and pulled its KV) and the direct one;
        # rank 0's the request without a header
        assert [a - b for a, b in zip(after, before, strict=True)] == [1, 2]
        assert await engine_counter(rank1, "vllm:nixl_xfer_time_seconds_count") - pulls == 1
        assert wrong.status_code == 400
        assert "names no data-parallel rank of this sidecar" in wrong.json()["message"]
        assert f"ports {port}-{port + 1}" in wrong.json()["message"]
        assert elsewhere.status_code == 400
        assert "10.9.9.9" in elsewhere.json()["message"]
        assert metric(app, "llmd_sidecar_data_parallel_requests_total", rank="1") == 1
        assert metric(app, "llmd_sidecar_requests_total", mode="pd", outcome="2xx") == 1
        assert (
            metric(app, "llmd_sidecar_requests_total", mode="decode-only", outcome="bad-rank") == 1
        )
        assert (
            metric(app, "llmd_sidecar_requests_total", mode="passthrough", outcome="bad-rank") == 1
        )
    finally:
        await app.stop()
        fleet.stop()


def test_data_parallel_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="less than or equal to 16"):
        SidecarConfig(data_parallel_size=17)
    with pytest.raises(ValueError, match="the rank ports run past 65535"):
        SidecarConfig(port=65535, data_parallel_size=2)
    with pytest.raises(ValueError, match="metrics_port 8001 is a rank's listener port"):
        SidecarConfig(port=8000, metrics_port=8001, data_parallel_size=4)
