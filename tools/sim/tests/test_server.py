"""The HTTP surface, KV events, P/D, LoRA and faults of simulated servers on real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx
import pytest
import zmq
import zmq.asyncio

from llmd.protocol.hashing import event_hash, vllm_block_hashes
from llmd.protocol.kv_events import END_SEQ, BlockStored, decode_batch, decode_seq, parse_topic
from llmd.protocol.metrics import parse_engine_snapshot
from llmd.protocol.openai import NixlTransferParams, iter_sse_data
from llmd.sim.server import SimServer

from .conftest import StartFleet, events_config

pytestmark = pytest.mark.integration

LONG = "people write the long document context " * 12


async def post(server: SimServer, path: str, body: Any, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        return await c.post(path, json=body, headers=headers)


async def get(server: SimServer, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        return await c.get(path)


async def test_completion_has_vllm_fields_and_request_id(start_fleet: StartFleet) -> None:
    s = (await start_fleet()).servers[0]
    r = await post(
        s, "/v1/completions", {"prompt": "hello world", "max_tokens": 3}, **{"X-Request-Id": "abc"}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["id"] == "cmpl-abc"
    assert body["model"] == "tiny"
    assert list(body) == [
        "id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
        "usage", "kv_transfer_params", "ec_transfer_params", "metrics",
    ]  # fmt: skip
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_repeated_prompt_reports_cached_tokens(start_fleet: StartFleet) -> None:
    s = (await start_fleet()).servers[0]
    first = await post(s, "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})
    second = await post(s, "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})
    n = first.json()["usage"]["prompt_tokens"]
    assert first.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16
    snap = parse_engine_snapshot((await get(s, "/metrics")).text)
    assert snap.prefix_cache_hits == (n - 1) // 16 * 16
    assert snap.prefix_cache_queries == 2 * n


async def test_streaming_chat_matches_vllm_chunk_sequence(start_fleet: StartFleet) -> None:
    s = (await start_fleet()).servers[0]
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = await post(s, "/v1/chat/completions", body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = iter_sse_data(r.content)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    assert "system_fingerprint" not in chunks[-2]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1])
    assert text  # the tokens' text arrives


async def test_non_streaming_n_and_prompt_lists(start_fleet: StartFleet) -> None:
    s = (await start_fleet()).servers[0]
    r = await post(s, "/v1/completions", {"prompt": ["a b", "c d e"], "max_tokens": 2, "n": 2})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize(
    ("body", "status", "kind", "needle"),
    [
        ({"model": "nope", "prompt": "x"}, 404, "NotFoundError", "does not exist"),
        ({"prompt": "x", "max_tokens": -1}, 400, "BadRequestError", "at least 1"),
        ({"prompt": "x", "max_tokens": 10**6}, 400, "BadRequestError", "max_model_len"),
        ({"prompt": "", "max_tokens": 1}, 400, "BadRequestError", "non-empty"),
        (
            {"prompt": "x", "stream_options": {"include_usage": True}},
            400,
            "BadRequestError",
            "stream",
        ),
        ({"prompt": "x", "max_tokens": "ten"}, 400, "BadRequestError", "max_tokens"),
    ],
)
async def test_bad_requests_get_vllm_errors(
    start_fleet: StartFleet, body: dict[str, Any], status: int, kind: str, needle: str
) -> None:
    s = (await start_fleet()).servers[0]
    r = await post(s, "/v1/completions", body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["type"] == kind
    assert needle in err["message"]
    assert err["code"] == status


async def test_malformed_json_and_unknown_paths(start_fleet: StartFleet) -> None:
    s = (await start_fleet()).servers[0]
    async with httpx.AsyncClient(base_url=s.url) as c:
        r = await c.post(
            "/v1/completions", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "Bad Request"
        r = await c.get("/v1/nope")
        assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
        r = await c.get("/v1/completions")
        assert r.status_code == 405
        ok = await c.post("/v1/completions", json={"prompt": "still serving", "max_tokens": 1})
        assert ok.status_code == 200


async def test_side_endpoints(start_fleet: StartFleet) -> None:
    s = (await start_fleet()).servers[0]
    assert (await get(s, "/health")).status_code == 200
    assert (await get(s, "/version")).json() == {"version": "0.32.0"}
    assert (await get(s, "/load")).json() == {"server_load": 0}
    models = (await get(s, "/v1/models")).json()
    assert models["data"][0]["id"] == "tiny"
    assert models["data"][0]["owned_by"] == "vllm"
    tok = (await post(s, "/tokenize", {"prompt": "hello world"})).json()
    assert tok["count"] == len(tok["tokens"])
    assert tok["token_strs"] is None
    text = (await post(s, "/detokenize", {"tokens": tok["tokens"]})).json()["prompt"]
    assert text == "hello world"
    chat = (await post(s, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})).json()
    assert chat["tokens"][0] == 1  # the template's BOS


async def test_kv_events_publish_replay_gap_and_restart(start_fleet: StartFleet) -> None:
    s = (await start_fleet(kv_events_config=events_config())).servers[0]
    assert s.cfg.kv_events_config is not None
    pub = s.cfg.kv_events_config.endpoint.replace("*", "127.0.0.1")
    replay = (s.cfg.kv_events_config.replay_endpoint or "").replace("*", "127.0.0.1")
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sub.connect(pub)
    await asyncio.sleep(0.3)  # slow joiner
    try:
        r = await post(s, "/v1/completions", {"prompt": LONG, "max_tokens": 1})
        tokens = (await post(s, "/tokenize", {"prompt": LONG})).json()["tokens"]
        topic, seq, payload = await asyncio.wait_for(sub.recv_multipart(), 5)
        assert parse_topic(topic).pod == s.pod_name
        assert decode_seq(seq) == 0
        batch = decode_batch(payload)
        stored = [e for e in batch.events if isinstance(e, BlockStored)]
        assert [int(h) for h in stored[0].block_hashes] == [
            event_hash(d) for d in vllm_block_hashes(tokens, 16)
        ]
        assert r.status_code == 200
        # a dropped batch leaves a gap the replay socket fills
        await post(s, "/sim/faults", {"drop_events_rate": 1.0})
        await post(s, "/v1/completions", {"prompt": "other " + LONG, "max_tokens": 1})
        await post(s, "/sim/faults", {"drop_events_rate": 0.0})
        await post(s, "/v1/completions", {"prompt": "third " + LONG, "max_tokens": 1})
        _, seq3, _ = await asyncio.wait_for(sub.recv_multipart(), 5)
        assert decode_seq(seq3) == 2  # seq 1 was dropped
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(replay)
        await dealer.send_multipart([b"", (1).to_bytes(8, "big")])
        got = []
        while True:
            frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
            if frames[2] == END_SEQ:
                break
            got.append(decode_seq(frames[2]))
        assert got == [1, 2]
        dealer.close(linger=0)
        # a restart resets the sequence
        await post(s, "/sim/faults", {"reset_event_sequence": True})
        await post(s, "/v1/completions", {"prompt": "fourth " + LONG, "max_tokens": 1})
        _, seq4, _ = await asyncio.wait_for(sub.recv_multipart(), 5)
        assert decode_seq(seq4) == 0
    finally:
        sub.close(linger=0)
        ctx.term()


def _transfer(role: str, **extra: Any) -> dict[str, Any]:
    return {"kv_connector": "NixlConnector", "kv_role": role, **extra}


async def test_pd_prefill_params_then_decode_pulls_once(start_fleet: StartFleet) -> None:
    prefill = (await start_fleet(kv_transfer_config=_transfer("kv_producer"))).servers[0]
    decode = (await start_fleet(kv_transfer_config=_transfer("kv_consumer"))).servers[0]
    leg1 = {
        "prompt": LONG,
        "max_tokens": 1,
        "kv_transfer_params": {
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None,
        },
    }  # fmt: skip
    r1 = await post(prefill, "/v1/completions", leg1)
    params = r1.json()["kv_transfer_params"]
    assert set(params) == set(NixlTransferParams.__struct_fields__)
    assert params["remote_num_tokens"] == r1.json()["usage"]["prompt_tokens"]
    assert isinstance(params["remote_block_ids"][0], list)
    assert (await get(prefill, "/sim/state")).json()["leases"] == 1
    r2 = await post(
        decode, "/v1/completions", {"prompt": LONG, "max_tokens": 4, "kv_transfer_params": params}
    )
    assert r2.status_code == 200, r2.text
    assert (
        r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        == params["remote_prefill_cached_tokens"]
    )
    assert (await get(prefill, "/sim/state")).json()["leases"] == 0
    metrics = (await get(decode, "/metrics")).text
    assert "vllm:num_requests_kv_fetch_by_stage" in metrics
    # the blocks were handed over: the same params again are a failed KV load
    r3 = await post(
        decode, "/v1/completions", {"prompt": LONG, "max_tokens": 1, "kv_transfer_params": params}
    )
    assert r3.status_code == 500
    assert "unknown or its KV lease expired" in r3.json()["error"]["message"]


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


async def test_an_encode_pod_answers_ec_params_and_a_consumer_skips_those_items(
    start_fleet: StartFleet,
) -> None:
    ec = {"ec_connector": "ECExampleConnector"}
    encoder = (await start_fleet(ec_transfer_config={**ec, "ec_role": "ec_producer"})).servers[0]
    consumer = (await start_fleet(ec_transfer_config={**ec, "ec_role": "ec_consumer"})).servers[0]
    plain = (await start_fleet()).servers[0]
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    body = {
        "model": "tiny",
        "max_tokens": 1,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this"},
                                                   IMAGE, audio]}],
    }  # fmt: skip
    r = await post(encoder, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    params = r.json()["ec_transfer_params"]
    assert len(params) == 2  # one entry per multimodal item, by hash
    assert all(p["size_bytes"] > 0 and p["peer_port"] > 0 for p in params.values())
    assert (await get(encoder, "/sim/state")).json()["mm_items"] == {"encoded": 2, "received": 0}
    # a consumer told where one item's encoding is encodes only the other
    one = dict(list(params.items())[:1])
    r = await post(consumer, "/v1/chat/completions", {**body, "ec_transfer_params": one})
    assert r.status_code == 200, r.text
    assert r.json()["ec_transfer_params"] is None  # consumers announce nothing
    assert (await get(consumer, "/sim/state")).json()["mm_items"] == {
        "encoded": 1, "received": 1
    }  # fmt: skip
    # an engine without an EC connector encodes everything, whatever the request says
    r = await post(plain, "/v1/chat/completions", {**body, "ec_transfer_params": params})
    assert r.status_code == 200, r.text
    assert (await get(plain, "/sim/state")).json()["mm_items"] == {"encoded": 2, "received": 0}


async def test_pd_invalid_params_fall_back_to_local_prefill(start_fleet: StartFleet) -> None:
    decode = (await start_fleet(kv_transfer_config=_transfer("kv_consumer"))).servers[0]
    partial = {"do_remote_prefill": True, "remote_block_ids": [[1]], "remote_engine_id": "x"}
    r = await post(
        decode, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "kv_transfer_params": partial}
    )
    assert r.status_code == 200
    no_blocks = {"do_remote_prefill": True, "remote_engine_id": "x"}
    r = await post(
        decode,
        "/v1/completions",
        {"prompt": "hi", "max_tokens": 2, "kv_transfer_params": no_blocks},
    )
    assert r.status_code == 500
    assert "remote_block_ids" in r.json()["error"]["message"]


async def test_pd_expired_lease_fails_or_recomputes(start_fleet: StartFleet) -> None:
    fast = {"kv_connector_extra_config": {"kv_lease_duration": 1}}
    prefill = (
        await start_fleet(kv_transfer_config=_transfer("kv_producer", **fast), speed=20.0)
    ).servers[0]
    fail = (await start_fleet(kv_transfer_config=_transfer("kv_consumer"))).servers[0]
    recompute = (
        await start_fleet(
            kv_transfer_config=_transfer("kv_consumer", kv_load_failure_policy="recompute")
        )
    ).servers[0]
    leg1 = {"prompt": LONG, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    params = (await post(prefill, "/v1/completions", leg1)).json()["kv_transfer_params"]
    await asyncio.sleep(0.25)  # 5 simulated seconds: the 1 s lease is reaped
    assert "vllm:nixl_num_kv_expired_reqs_total" in (await get(prefill, "/metrics")).text
    assert (await get(prefill, "/sim/state")).json()["leases"] == 0
    body = {"prompt": LONG, "max_tokens": 2, "kv_transfer_params": params}
    assert (await post(fail, "/v1/completions", body)).status_code == 500
    assert (await post(recompute, "/v1/completions", body)).status_code == 200


async def test_lora_load_serve_unload(start_fleet: StartFleet) -> None:
    s = (
        await start_fleet(
            enable_lora=True,
            allow_runtime_lora_updating=True,
            lora_modules=[{"name": "sql", "path": "/l/sql"}],
        )
    ).servers[0]
    r = await post(s, "/v1/load_lora_adapter", {"lora_name": "chat", "lora_path": "/l/chat"})
    assert r.status_code == 200
    assert "added successfully" in r.text
    again = await post(s, "/v1/load_lora_adapter", {"lora_name": "chat", "lora_path": "/l/chat"})
    assert again.status_code == 400
    ids = [m["id"] for m in (await get(s, "/v1/models")).json()["data"]]
    assert ids == ["tiny", "sql", "chat"]
    r = await post(s, "/v1/completions", {"model": "chat", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 200
    assert r.json()["model"] == "chat"
    assert 'vllm:lora_requests_info{max_lora="1"' in (await get(s, "/metrics")).text
    assert (await post(s, "/v1/unload_lora_adapter", {"lora_name": "chat"})).status_code == 200
    gone = await post(s, "/v1/completions", {"model": "chat", "prompt": "x", "max_tokens": 1})
    assert gone.status_code == 404


async def test_error_rate_hang_and_crash_faults(start_fleet: StartFleet) -> None:
    s = (await start_fleet()).servers[0]
    await post(s, "/sim/faults", {"error_rate": 1.0})
    r = await post(s, "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert r.status_code == 500
    assert "error_rate" in r.json()["error"]["message"]
    await post(s, "/sim/faults", {"error_rate": 0.0, "hang": True})
    with pytest.raises(httpx.ReadTimeout):
        async with httpx.AsyncClient(base_url=s.url, timeout=0.5) as c:
            await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert (await get(s, "/health")).status_code == 200  # a hung engine still answers health
    await post(s, "/sim/faults", {"hang": False})
    assert (await post(s, "/v1/completions", {"prompt": "y", "max_tokens": 1})).status_code == 200
    await post(s, "/sim/faults", {"crash": True})
    await asyncio.sleep(0.3)
    with pytest.raises(httpx.ConnectError):
        await get(s, "/health")


async def test_fleet_servers_are_independent(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(count=3)
    for s in fleet.servers:
        await post(s, "/v1/completions", {"prompt": LONG, "max_tokens": 1})
    again = await post(fleet.servers[1], "/v1/completions", {"prompt": LONG, "max_tokens": 1})
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    doc = fleet.endpoints_document()
    assert [e["name"] for e in doc["endpoints"]] == ["sim-0", "sim-1", "sim-2"]
    assert len({s.url for s in fleet.servers}) == 3


def _outward_address() -> str:
    """This machine's address on its default route (not loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))  # picks a route; sends nothing
        address: str = s.getsockname()[0]
    return address


async def test_kv_sockets_bind_where_the_http_api_does(start_fleet: StartFleet) -> None:
    """`tcp://*:<port>` used to bind every interface; it now means the simulator's --host."""
    s = (await start_fleet(kv_events_config=events_config())).servers[0]
    assert s.cfg.host == "127.0.0.1"
    assert s.cfg.kv_events_config is not None
    outward = _outward_address()
    assert not outward.startswith("127.")
    for endpoint in (s.cfg.kv_events_config.endpoint, s.cfg.kv_events_config.replay_endpoint):
        assert endpoint is not None
        assert endpoint.startswith("tcp://*:")
        port = int(endpoint.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # reachable on loopback
        with pytest.raises(OSError):  # and nowhere else
            socket.create_connection((outward, port), timeout=2).close()


async def test_a_shared_storage_tier_serves_one_servers_prompt_to_another(
    start_fleet: StartFleet,
) -> None:
    """Two servers mounting one simulated volume: what A computed, B loads (cached_tokens from
    the 'disk' source) instead of prefilling; the tier's stores and evictions go out as STORAGE
    events owned by the domain, and the fleet document labels both servers with it."""
    fleet = await start_fleet(
        2,
        kv_events_config=events_config(),
        storage={"domain": "vol", "capacity_tokens": 96, "latency_ms": 0},
    )
    a, b = fleet.servers
    assert b.cfg.kv_events_config is not None
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sub.connect(b.cfg.kv_events_config.endpoint.replace("*", "127.0.0.1"))
    await asyncio.sleep(0.3)  # slow joiner
    try:
        first = await post(a, "/v1/completions", {"prompt": LONG, "max_tokens": 1})
        n = first.json()["usage"]["prompt_tokens"]
        full = (n - 1) // 16 * 16
        second = await post(b, "/v1/completions", {"prompt": LONG, "max_tokens": 1})
        assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == full
        text = (await get(b, "/metrics")).text
        assert (
            f'vllm:prompt_tokens_cached_by_source_total{{engine="0",model_name="tiny",source="disk"}} {float(full)}'
            in text
            or f'source="disk"}} {float(full)}' in text
        )
        load_bytes = [
            ln for ln in text.splitlines() if ln.startswith("vllm:kv_offload_load_bytes_total{")
        ]
        assert load_bytes
        assert float(load_bytes[0].split()[-1]) == full * 131_072
        assert "vllm:kv_offload_load_time_total{" in text
        assert "llmd_fs_offload_stores_dropped_total{" in text
        # B stores the prompt of its own next request; the 96-token volume evicts the oldest
        other = await post(b, "/v1/completions", {"prompt": "other " + LONG, "max_tokens": 1})
        assert other.status_code == 200
        seen: list[Any] = []

        def storage_kinds() -> set[bool]:
            return {
                isinstance(e, BlockStored) for e in seen if getattr(e, "medium", None) == "STORAGE"
            }

        # a BlockStored goes out when its write has finished, so it may follow the removals
        while storage_kinds() != {True, False}:
            _, _, payload = await asyncio.wait_for(sub.recv_multipart(), 5)
            seen += decode_batch(payload).events
        storage = [e for e in seen if getattr(e, "medium", None) == "STORAGE"]
        assert {e.ownership for e in storage} == {"fs:vol"}
        assert any(isinstance(e, BlockStored) for e in storage)
        assert any(not isinstance(e, BlockStored) for e in storage), "evictions are announced"
    finally:
        sub.close(linger=0)
        ctx.term()
    labels = [e["labels"] for e in fleet.endpoints_document()["endpoints"]]
    assert all(lbl["llmd.ai/storage-domain"] == "vol" for lbl in labels)


async def test_requests_for_a_prefix_being_loaded_wait_for_that_load(
    start_fleet: StartFleet,
) -> None:
    """Three requests for one stored prefix, at once, on a server whose GPU does not hold it:
    the prefix is loaded from the volume once; the other two wait for that load and find the
    prefix on the GPU, as vLLM's offloading connector delays a request whose chunks are
    being loaded, not load it again."""
    fleet = await start_fleet(2, storage={"domain": "vol", "latency_ms": 0, "read_gbps": 0.05})
    a, b = fleet.servers
    first = await post(a, "/v1/completions", {"prompt": LONG, "max_tokens": 1})
    full = (first.json()["usage"]["prompt_tokens"] - 1) // 16 * 16
    await asyncio.sleep(0.5)  # the store's write finishes
    replies = await asyncio.gather(
        *(post(b, "/v1/completions", {"prompt": f"{LONG} q{k}", "max_tokens": 1}) for k in range(3))
    )
    cached = [r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for r in replies]
    assert min(cached) >= full
    text = (await get(b, "/metrics")).text
    by_source = {
        src: float(ln.split()[-1])
        for ln in text.splitlines()
        if ln.startswith("vllm:prompt_tokens_cached_by_source_total{")
        for src in ("disk", "device")
        if f'source="{src}"' in ln
    }
    assert by_source["disk"] == full, "loaded once"
    assert by_source["device"] >= 2 * full, "the others hit the loaded blocks on the GPU"
    load = [ln for ln in text.splitlines() if ln.startswith("vllm:kv_offload_load_bytes_total{")]
    assert float(load[0].split()[-1]) == full * 131_072
