"""The sidecar's encoder stage (E/P/D) on real processes: two encode `llmd-sim` engines (EC
producers), a prefill and a decode engine that read encoder outputs named by
`ec_transfer_params` (EC consumers) and move KV with vLLM 0.32's NixlConnector contract."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from llmd.dev.sim_engines import SimFleetProcess, free_run
from llmd.sidecar.app import SidecarApp, SidecarConfig
from llmd.vllm_cpu.server import free_port

pytestmark = pytest.mark.integration


@dataclass
class Engines:
    encoders: list[str]
    prefill: str
    decode: str


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    tmp = tmp_path_factory.mktemp("epd")
    fleets = [
        SimFleetProcess.start_encoders(tmp, count=2),
        SimFleetProcess.start_pd("kv_producer", tmp, ec_consumer=True),
        SimFleetProcess.start_pd("kv_consumer", tmp, ec_consumer=True),
    ]
    try:
        enc, pre, dec = fleets
        yield Engines([e.url for e in enc.engines], pre.engines[0].url, dec.engines[0].url)
    finally:
        for f in fleets:
            f.stop()


@pytest.fixture
async def start() -> AsyncIterator[Any]:
    apps: list[SidecarApp] = []

    async def run(decode_url: str, **settings: Any) -> SidecarApp:
        port = int(decode_url.rsplit(":", 1)[1])
        config = SidecarConfig(
            host="127.0.0.1", port=free_port(), model_server_port=port,
            metrics_port=free_port(), **settings,
        )  # fmt: skip
        app = SidecarApp(config)
        await app.start()
        apps.append(app)
        return app

    yield run
    for app in apps:
        await app.stop()


def host(url: str) -> str:
    return url.removeprefix("http://")


def metric(app: SidecarApp, name: str, **labels: str) -> float:
    return app.registry.get_sample_value(name, labels) or 0.0


async def mm(engine: str) -> dict[str, int]:
    async with httpx.AsyncClient() as c:
        items: dict[str, int] = (await c.get(f"{engine}/sim/state")).json()["mm_items"]
    return items


def image(n: int) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": f"https://example.com/{n}.png"}}


def chat(*parts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    content = [{"type": "text", "text": "compare these pictures in detail " * 10}, *parts]
    return {"model": "tiny", "max_tokens": 8,
            "messages": [{"role": "user", "content": content}], **extra}  # fmt: skip


async def post(app: SidecarApp, body: dict[str, Any], **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as c:
        return await c.post(
            f"http://127.0.0.1:{app.config.port}/v1/chat/completions",
            json=body,
            headers={k.replace("_", "-"): v for k, v in headers.items()},
        )


async def test_ec_nixl_encodes_each_item_once_and_the_prefill_and_decode_read_them(
    engines: Engines, start: Any
) -> None:
    app = await start(engines.decode, ec_connector="ec-nixl")
    before = [await mm(e) for e in (*engines.encoders, engines.prefill, engines.decode)]
    r = await post(
        app, chat(image(1), image(2), image(3), stream=True),
        x_prefiller_host_port=host(engines.prefill),
        x_encoder_hosts_ports=",".join(host(e) for e in engines.encoders),
    )  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.text.rstrip().endswith("data: [DONE]")
    after = [await mm(e) for e in (*engines.encoders, engines.prefill, engines.decode)]
    delta = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
    # round robin over the two encoders: items 0 and 2 on the first, item 1 on the second
    assert delta[0] == {"encoded": 2, "received": 0}
    assert delta[1] == {"encoded": 1, "received": 0}
    # the prefill and the decode engine were told where all three encodings are
    assert delta[2] == {"encoded": 0, "received": 3}
    assert delta[3] == {"encoded": 0, "received": 3}
    assert metric(app, "llmd_sidecar_requests_total", mode="encode-pd", outcome="2xx") == 1
    assert metric(app, "llmd_sidecar_encoder_items_total", outcome="ok") == 3
    assert metric(app, "llmd_sidecar_encode_duration_seconds_count") == 1
    assert metric(app, "llmd_sidecar_true_ttft_seconds_count") == 1


async def test_encode_decode_without_a_prefiller_and_text_only_requests(
    engines: Engines, start: Any
) -> None:
    app = await start(engines.decode, ec_connector="ec-nixl")
    enc = host(engines.encoders[1])
    before = await mm(engines.decode)
    r = await post(app, chat(image(4)), x_encoder_hosts_ports=enc)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
    assert await mm(engines.decode) == {**before, "received": before["received"] + 1}
    assert metric(app, "llmd_sidecar_requests_total", mode="encode-decode", outcome="2xx") == 1
    # a text-only chat naming an encoder reaches no encoder
    items = metric(app, "llmd_sidecar_encoder_items_total", outcome="ok")
    r = await post(app, chat(), x_encoder_hosts_ports=enc)
    assert r.status_code == 200, r.text
    assert metric(app, "llmd_sidecar_encoder_items_total", outcome="ok") == items


async def test_ec_example_primes_the_encoders_and_adds_no_params(
    engines: Engines, start: Any
) -> None:
    app = await start(engines.decode, ec_connector="ec-example")
    before = [await mm(e) for e in (engines.encoders[0], engines.decode)]
    r = await post(app, chat(image(5)), x_encoder_hosts_ports=host(engines.encoders[0]))
    assert r.status_code == 200, r.text
    enc, dec = await mm(engines.encoders[0]), await mm(engines.decode)
    assert enc["encoded"] == before[0]["encoded"] + 1
    # the outputs are on shared storage for a real engine; the request itself names none, so
    # the simulated decode engine (which reads only named outputs) encodes the item again
    assert dec["received"] == before[1]["received"]
    assert dec["encoded"] == before[1]["encoded"] + 1


async def test_a_failed_encoder_is_a_502_naming_it_and_nothing_reaches_the_decoder(
    engines: Engines, start: Any
) -> None:
    app = await start(engines.decode, ec_connector="ec-nixl")
    dead = f"127.0.0.1:{free_run(1)}"
    before = await mm(engines.decode)
    r = await post(
        app, chat(image(6), image(7)),
        x_encoder_hosts_ports=f"{host(engines.encoders[0])},{dead}",
    )  # fmt: skip
    assert r.status_code == 502, r.text
    message = r.json()["message"]
    assert f"the encoder leg of item 1 at http://{dead}/v1/chat/completions failed" in message
    assert metric(app, "llmd_sidecar_requests_total", mode="encode-decode",
                  outcome="encode-error") == 1  # fmt: skip
    assert metric(app, "llmd_sidecar_encoder_items_total", outcome="error") == 1
    assert await mm(engines.decode) == before
    # an encoder answering an error: its status and message are in the 502
    r = await post(
        app, chat(image(8), model="no-such-model"),
        x_encoder_hosts_ports=host(engines.encoders[0]),
    )  # fmt: skip
    assert r.status_code == 502
    assert "with status 404" in r.json()["message"]
    assert "no-such-model" in r.json()["message"]


async def test_ssrf_protection_drops_encoders_outside_the_allowlist(
    engines: Engines, start: Any
) -> None:
    app = await start(
        engines.decode, ec_connector="ec-nixl", enable_ssrf_protection=True,
        allowed_prefill_hosts=["10.9.9.9"],
    )  # fmt: skip
    before = await mm(engines.encoders[0])
    r = await post(app, chat(image(9)), x_encoder_hosts_ports=host(engines.encoders[0]))
    assert r.status_code == 200, r.text  # served: the decode engine encoded the item itself
    assert await mm(engines.encoders[0]) == before
    assert metric(app, "llmd_sidecar_ssrf_refused_encoders_total") == 1
    assert metric(app, "llmd_sidecar_requests_total", mode="decode-only", outcome="2xx") == 1


async def test_without_an_ec_connector_the_encoder_header_is_ignored(
    engines: Engines, start: Any
) -> None:
    app = await start(engines.decode)
    before = await mm(engines.encoders[0])
    r = await post(app, chat(image(10)), x_encoder_hosts_ports=host(engines.encoders[0]))
    assert r.status_code == 200, r.text
    assert await mm(engines.encoders[0]) == before
    assert metric(app, "llmd_sidecar_requests_total", mode="decode-only", outcome="2xx") == 1
    assert metric(app, "llmd_sidecar_encoder_header_ignored_total") == 1
