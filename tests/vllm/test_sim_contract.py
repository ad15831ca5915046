"""llmd-sim against real vLLM 0.32: the same requests, the same answers (but for timing and text).

Both servers use the tiny model directory, block size 32 and sha256 hashing. The simulator runs
as a separate process started through its CLI, as users start it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq

from llmd.protocol.kv_events import BlockStored, decode_batch
from llmd.protocol.metrics import (
    SNAPSHOT_METRICS,
    VLLM,
    dialect_sample_names,
    parse_engine_snapshot,
    sample_names,
)
from llmd.runtime.enginepool import filtered_path
from llmd.vllm_cpu.install import VllmEnv
from llmd.vllm_cpu.server import VllmServer, free_port, nixl_server_spec, start_servers

pytestmark = pytest.mark.vllm

MODEL = "tiny"


class SimProcess:
    """`llmd-sim` in a subprocess, configured like the vLLM fixtures' servers."""

    def __init__(self, model_dir: Path, log_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.events_port = free_port()
        self.replay_port = free_port()
        events = {
            "enable_kv_cache_events": True,
            "endpoint": f"tcp://*:{self.events_port}",
            "replay_endpoint": f"tcp://*:{self.replay_port}",
        }
        cmd = [
            sys.executable,
            "-m",
            "llmd.sim.cli",
            "--model",
            str(model_dir),
            "--served-model-name",
            MODEL,
            "--port",
            str(self.port),
            "--block-size",
            "32",
            "--max-model-len",
            "4096",
            "--num-gpu-blocks-override",
            "16384",
            "--prefix-caching-hash-algo",
            "sha256",
            "--enable-prompt-tokens-details",
            "--profile",
            "cpu-tiny",
            "--pod-name",
            "sim-contract",
            "--kv-events-config",
            json.dumps(events),
            *extra,
        ]
        self.log = (log_dir / f"sim-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"llmd-sim exited: see {self.log.name}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError("llmd-sim did not become healthy in 60 s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.log.close()


@pytest.fixture(scope="module")
def sim(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    proc = SimProcess(tiny_model_dir, tmp_path_factory.mktemp("sim"))
    yield proc
    proc.stop()


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys (in order) and value types, not the values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return None
    return type(value).__name__


def call(
    url: str, method: str, path: str, body: Any = None, raw: bytes | None = None
) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=60) as c:
        if raw is not None:
            return c.request(
                method, path, content=raw, headers={"content-type": "application/json"}
            )
        return c.request(method, path, json=body)


BOTH = ("vllm", "sim")


def urls(vllm_server: VllmServer, sim: SimProcess) -> dict[str, str]:
    return {"vllm": vllm_server.url, "sim": sim.url}


def test_side_endpoints_answer_alike(vllm_server: VllmServer, sim: SimProcess) -> None:
    u = urls(vllm_server, sim)
    for method, path, body in [
        ("GET", "/v1/models", None),
        ("GET", "/version", None),
        ("GET", "/load", None),
        ("POST", "/tokenize", {"model": MODEL, "prompt": "hello world the system"}),
        ("POST", "/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        ("POST", "/detokenize", {"model": MODEL, "tokens": [265, 288, 84]}),
    ]:
        got = {k: call(u[k], method, path, body) for k in BOTH}
        assert got["vllm"].status_code == got["sim"].status_code == 200, path
        assert shape(got["vllm"].json()) == shape(got["sim"].json()), path
        if path in ("/tokenize", "/detokenize", "/version"):
            assert got["vllm"].json() == got["sim"].json(), path
    health = {k: call(u[k], "GET", "/health") for k in BOTH}
    assert health["vllm"].status_code == health["sim"].status_code == 200
    assert health["vllm"].content == health["sim"].content == b""


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "hello world the system", "max_tokens": 3}),
        ("/v1/completions", {"prompt": [5, 6, 7, 8], "max_tokens": 2, "n": 2}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3},
        ),
    ],
)
def test_responses_have_the_same_shape_and_usage(
    vllm_server: VllmServer, sim: SimProcess, path: str, body: dict[str, Any]
) -> None:
    u = urls(vllm_server, sim)
    full = {"model": MODEL, "ignore_eos": True, **body}
    got = {k: call(u[k], "POST", path, full).json() for k in BOTH}
    assert shape(got["vllm"]) == shape(got["sim"])
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert got["vllm"]["usage"][key] == got["sim"]["usage"][key], key
    assert got["vllm"]["object"] == got["sim"]["object"]


def _stream_shapes(url: str, path: str, body: dict[str, Any]) -> list[Any]:
    raw = call(url, "POST", path, body).content
    out: list[Any] = []
    for block in raw.split(b"\n\n"):
        if not block.startswith(b"data: "):
            continue
        data = block[6:]
        item = "[DONE]" if data == b"[DONE]" else shape(json.loads(data))
        if not out or out[-1] != item:  # a run of content chunks is one shape
            out.append(item)
    return out


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("include_usage", [False, True])
def test_streams_have_the_same_chunk_sequence(
    vllm_server: VllmServer, sim: SimProcess, chat: bool, include_usage: bool
) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 6, "ignore_eos": True, "stream": True}
    if chat:
        body["messages"] = [{"role": "user", "content": "stream please"}]
    else:
        body["prompt"] = "stream please"
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    u = urls(vllm_server, sim)
    assert _stream_shapes(u["vllm"], path, body) == _stream_shapes(u["sim"], path, body)


@pytest.mark.parametrize(
    ("body", "raw"),
    [
        (None, b"{nope"),
        ({"model": "nope", "prompt": "x"}, None),
        ({"model": MODEL, "prompt": "x", "max_tokens": 100000}, None),
        ({"model": MODEL, "prompt": "x", "max_tokens": -1}, None),
        ({"model": MODEL, "prompt": "", "max_tokens": 2}, None),
        ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, None),
    ],
)
def test_errors_have_the_same_status_and_shape(
    vllm_server: VllmServer, sim: SimProcess, body: Any, raw: bytes | None
) -> None:
    u = urls(vllm_server, sim)
    got = {k: call(u[k], "POST", "/v1/completions", body, raw) for k in BOTH}
    assert got["vllm"].status_code == got["sim"].status_code
    v, s = got["vllm"].json(), got["sim"].json()
    assert shape(v) == shape(s)
    assert v["error"]["type"] == s["error"]["type"]
    assert v["error"]["param"] == s["error"]["param"]


def test_unknown_paths_answer_alike(vllm_server: VllmServer, sim: SimProcess) -> None:
    u = urls(vllm_server, sim)
    got = {k: call(u[k], "GET", "/v1/nope") for k in BOTH}
    assert got["vllm"].status_code == got["sim"].status_code == 404
    assert got["vllm"].json() == got["sim"].json()


def _families(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """vllm:* families: name -> (type, label names of its samples, `le` excluded)."""
    types: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE vllm:"):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line.startswith("vllm:"):
            name, _, rest = line.partition("{")
            keys = {kv.split("=", 1)[0] for kv in rest.split("}")[0].split('",') if "=" in kv}
            for suffix in ("_bucket", "_count", "_sum"):
                if name.endswith(suffix) and name[: -len(suffix)] in types:
                    name = name[: -len(suffix)]
            labels.setdefault(name, set()).update(keys - {"le"})
    return {n: (t, frozenset(labels.get(n, ()))) for n, t in types.items()}


def test_metrics_have_vllm_names_types_and_labels(vllm_server: VllmServer, sim: SimProcess) -> None:
    u = urls(vllm_server, sim)
    call(u["sim"], "POST", "/v1/completions", {"model": MODEL, "prompt": "warm", "max_tokens": 2})
    pages = {k: call(u[k], "GET", "/metrics") for k in BOTH}
    assert pages["vllm"].headers["content-type"] == pages["sim"].headers["content-type"]
    real, simulated = _families(pages["vllm"].text), _families(pages["sim"].text)
    invented = set(simulated) - set(real)
    assert not invented, f"metrics vLLM does not have: {sorted(invented)}"
    for name, (kind, labels) in simulated.items():
        assert real[name] == (kind, labels), name
    read_by_llmd = set(SNAPSHOT_METRICS) - {"vllm:lora_requests_info"}  # only with --enable-lora
    read_by_llmd |= {
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:request_success_total",
        "vllm:e2e_request_latency_seconds",
        "vllm:num_requests_waiting_by_reason",
    }
    assert read_by_llmd <= set(simulated)
    covered = len(simulated) / len(real)
    assert covered > 0.8, f"the simulator exposes {len(simulated)} of vLLM's {len(real)} families"


def test_the_metrics_name_filter_answers_alike(vllm_server: VllmServer, sim: SimProcess) -> None:
    """The scheduler's filtered scrapes rest on this: `/metrics/?name[]=...` returns only the
    asked-for samples, the plain `/metrics` route ignores the query, on vLLM as on the sim."""
    u = urls(vllm_server, sim)
    wanted = dialect_sample_names(VLLM)
    path = filtered_path("/metrics", wanted)
    for k in BOTH:
        filtered = call(u[k], "GET", path)
        assert filtered.status_code == 200, (k, filtered.text[:200])
        got = sample_names(filtered.text)
        whole = call(u[k], "GET", "/metrics")
        assert got <= wanted, (k, sorted(got - wanted))
        assert sample_names(whole.text) & wanted <= got, k
        assert {"vllm:num_requests_waiting", "vllm:cache_config_info"} <= got, k
        unfiltered = call(u[k], "GET", "/metrics?" + path.partition("?")[2])
        assert "vllm:e2e_request_latency_seconds_count" in sample_names(unfiltered.text), k
        assert parse_engine_snapshot(filtered.text) == parse_engine_snapshot(whole.text), k


def _first_stored(url: str, events_endpoint: str, body: dict[str, Any], path: str) -> BlockStored:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(events_endpoint)
    time.sleep(0.5)
    try:
        while sub.poll(200):
            sub.recv_multipart()  # older batches
        r = call(url, "POST", path, body)
        assert r.status_code == 200, r.text
        while sub.poll(5000):
            _, _, payload = sub.recv_multipart()
            for event in decode_batch(payload).events:
                if isinstance(event, BlockStored) and event.parent_block_hash is None:
                    return event
        raise AssertionError("no BlockStored event")
    finally:
        sub.close(linger=0)
        ctx.term()


@pytest.mark.parametrize("chat", [False, True])
def test_kv_events_are_identical_for_the_same_prompt(
    vllm_server: VllmServer, sim: SimProcess, chat: bool
) -> None:
    salt = uuid.uuid4().hex[:8]
    text = f"event contract {salt} " + "people write the long document context " * 20
    if chat:
        path = "/v1/chat/completions"
        body: dict[str, Any] = {"messages": [{"role": "user", "content": text}]}
    else:
        path, body = "/v1/completions", {"prompt": text}
    body |= {"model": MODEL, "max_tokens": 1}
    real = _first_stored(vllm_server.url, vllm_server.kv_events_endpoint, body, path)
    simulated = _first_stored(sim.url, f"tcp://127.0.0.1:{sim.events_port}", body, path)
    assert real == simulated  # hashes, parent, tokens, block size, medium, extra keys, group


def test_cached_tokens_agree_on_a_repeated_prompt(vllm_server: VllmServer, sim: SimProcess) -> None:
    text = f"cache contract {uuid.uuid4().hex} " + "the system answer " * 60
    body = {"model": MODEL, "prompt": text, "max_tokens": 2, "ignore_eos": True}
    u = urls(vllm_server, sim)
    for k in BOTH:
        call(u[k], "POST", "/v1/completions", body)
    second = {k: call(u[k], "POST", "/v1/completions", body).json() for k in BOTH}
    cached = {k: second[k]["usage"]["prompt_tokens_details"]["cached_tokens"] for k in BOTH}
    assert cached["vllm"] == cached["sim"] > 0


@pytest.fixture(scope="module")
def vllm_prefill(
    vllm_env: VllmEnv, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    """A real vLLM prefill engine (NixlConnector, kv_producer), only for this module."""
    spec = nixl_server_spec("vllm-prefill", tiny_model_dir, "kv_producer", cpu_core=1)
    (server,) = start_servers(vllm_env, [spec], tmp_path_factory.mktemp("vllm-prefill"))
    yield server
    server.stop()


def test_prefill_kv_transfer_params_have_vllm_keys(
    vllm_prefill: VllmServer, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    producer = SimProcess(
        tiny_model_dir,
        tmp_path_factory.mktemp("sim-prefill"),
        "--kv-transfer-config",
        json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_producer"}),
        "--side-channel-port",
        str(free_port()),
    )
    try:
        body = {
            "model": MODEL,
            "prompt": "prefill contract " + "the system answer " * 30,
            "max_tokens": 1,
            "kv_transfer_params": {
                "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                "remote_block_ids": None, "remote_host": None, "remote_port": None,
            },
        }  # fmt: skip
        real = call(vllm_prefill.url, "POST", "/v1/completions", body).json()
        simulated = call(producer.url, "POST", "/v1/completions", body).json()
        assert real["kv_transfer_params"] is not None
        assert shape(real["kv_transfer_params"]) == shape(simulated["kv_transfer_params"])
        assert real["choices"][0]["finish_reason"] == simulated["choices"][0]["finish_reason"]
        for key in ("remote_num_tokens", "do_remote_prefill", "transfer_mode", "tp_size"):
            assert real["kv_transfer_params"][key] == simulated["kv_transfer_params"][key], key
    finally:
        producer.stop()
