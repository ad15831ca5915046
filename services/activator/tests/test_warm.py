"""Warm start: a replica that joins the pool gets the hot prompts from the shared FS tier before
the first user request for them, on real engine processes (simulated vLLM) sharing a volume."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import aiohttp.web
import httpx
import pytest
from prometheus_client import CollectorRegistry

from llmd.activator.app import ActivatorApp, ActivatorConfig
from llmd.activator.warm import Warmer, load_warm_prompts
from llmd.dev.cluster import LocalCluster, SimLauncher
from llmd.dev.gateway import Gateway
from llmd.protocol.metrics import parse_samples
from llmd.runtime.config import ConfigError
from llmd.vllm_cpu.server import free_port

HOT = "You are the support agent of a company that sells garden tools. " * 60


def test_bad_warm_prompts_are_named_one_by_one(tmp_path: Path) -> None:
    f = tmp_path / "warm.yaml"
    f.write_text(
        "- hello\n"
        "- {prompt: hi, messages: [{role: user, content: x}]}\n"
        "- 3\n"
        "- {messages: []}\n"
        "- {prompt: hi, temperature: 0}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_warm_prompts(str(f), "tiny")
    text = str(err.value)
    assert "warm_prompts_file[0]" not in text
    assert "warm_prompts_file[1]: needs exactly one of prompt, messages" in text
    assert "warm_prompts_file[2]: must be a prompt string or a mapping, got int" in text
    assert "warm_prompts_file[3]: messages must be a non-empty list" in text
    assert "warm_prompts_file[4]: unknown key(s) ['temperature']" in text
    with pytest.raises(ConfigError, match="no model"):
        load_warm_prompts(str(f), "")
    f.write_text("prompts: [a]\n")
    with pytest.raises(ConfigError, match="must hold a non-empty list"):
        load_warm_prompts(str(f), "tiny")
    with pytest.raises(ConfigError, match="cannot read"):
        load_warm_prompts(str(tmp_path / "missing.yaml"), "tiny")
    f.write_text("- [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_warm_prompts(str(f), "tiny")


def test_chat_and_completion_prompts_become_one_token_requests(tmp_path: Path) -> None:
    f = tmp_path / "warm.yaml"
    f.write_text("- hello\n- {messages: [{role: system, content: be brief}], model: other}\n")
    a, b = load_warm_prompts(str(f), "tiny")
    assert a.path == "/v1/completions"
    assert a.body == b'{"model":"tiny","max_tokens":1,"stream":false,"prompt":"hello"}'
    assert b.path == "/v1/chat/completions"
    assert b'"model":"other"' in b.body
    assert b'"max_tokens":1' in b.body


@pytest.fixture
async def shared_volume_pool(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    """Engines of one pool mounting one simulated FS-tier volume (a directory)."""
    launcher = SimLauncher(
        extra_args=("--storage-domain", "vol", "--storage-dir", str(tmp_path / "vol"))
    )
    cluster = LocalCluster({"sim": launcher}, tmp_path / "endpoints.yaml", tmp_path)
    await cluster.scale("sim", 1)
    await cluster.wait_ready("sim", 60)
    yield cluster
    await cluster.close()


def _sources(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in parse_samples(text):
        if s.name == "vllm:prompt_tokens_cached_by_source_total":
            out[s.labels["source"]] = s.value
    return out


@pytest.mark.integration
async def test_a_new_replica_is_warmed_from_the_fs_tier(
    shared_volume_pool: LocalCluster, tmp_path: Path
) -> None:
    cluster = shared_volume_pool
    (first,) = await cluster.endpoints("sim")
    async with httpx.AsyncClient(timeout=30) as c:
        # the first replica computes the hot prompt and stores its blocks on the volume
        r = await c.post(
            f"http://{first.host_port}/v1/completions",
            json={"model": "tiny", "prompt": HOT, "max_tokens": 1},
        )
        assert r.status_code == 200, r.text
        hot_tokens = r.json()["usage"]["prompt_tokens"]
        await asyncio.sleep(0.5)  # the store's write finishes
        warm = tmp_path / "warm.yaml"
        warm.write_text(f"- {HOT!r}\n")
        port = free_port()
        cfg = ActivatorConfig.model_validate(
            {"pool": "sim", "host": "127.0.0.1", "http_port": port,
             "warm_prompts_file": str(warm), "warm_model": "tiny"}
        )  # fmt: skip
        app = ActivatorApp(cfg, cluster)
        await app.start()
        try:
            await asyncio.wait_for(app.activator.synced.wait(), 10)
            assert "warms new replicas with 1 prompt(s)" in app.describe()
            await cluster.scale("sim", 2)
            for _ in range(300):
                if app.registry.get_sample_value(
                    "llmd_activator_warmed_replicas_total", {"pool": "sim"}
                ):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the new replica was not warmed")
            ok = app.registry.get_sample_value(
                "llmd_activator_warm_requests_total", {"pool": "sim", "outcome": "ok"}
            )
            assert ok == 1
            loaded = app.registry.get_sample_value(
                "llmd_activator_warm_prompt_tokens_total", {"pool": "sim", "source": "cached"}
            )
            block = 16
            assert loaded == (hot_tokens - 1) // block * block, "the warm-up loaded the volume"
            (new,) = [e for e in await cluster.endpoints("sim") if e != first]
            before = _sources((await c.get(f"http://{new.host_port}/metrics")).text)
            assert before["disk"] == loaded
            r = await c.post(
                f"http://{new.host_port}/v1/completions",
                json={"model": "tiny", "prompt": HOT + " Where is my order?", "max_tokens": 1},
            )
            assert r.status_code == 200, r.text
            cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached >= loaded
            after = _sources((await c.get(f"http://{new.host_port}/metrics")).text)
            assert after["disk"] == before["disk"], "nothing loaded: the prefix was on the GPU"
            assert after["device"] - before["device"] == cached
            # the replica that was up when the activator started was not warmed
            first_after = _sources((await c.get(f"http://{first.host_port}/metrics")).text)
            assert first_after["disk"] == 0
        finally:
            await app.stop()


@pytest.mark.integration
async def test_prefixes_of_a_replica_removed_on_scale_down_stay_on_the_volume(
    shared_volume_pool: LocalCluster,
) -> None:
    """Scale-down with an FS tier: what the drained replica computed is loaded, not computed
    again, by the replica that remains."""
    cluster = shared_volume_pool
    (old,) = await cluster.endpoints("sim")
    await cluster.scale("sim", 2)
    await cluster.wait_ready("sim", 60)
    (victim,) = [e for e in await cluster.endpoints("sim") if e != old]
    body = {"model": "tiny", "prompt": HOT + " Which rake?", "max_tokens": 1}
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.post(f"http://{victim.host_port}/v1/completions", json=body)
        assert r.status_code == 200, r.text
        full = (r.json()["usage"]["prompt_tokens"] - 1) // 16 * 16
        await cluster.scale("sim", 1)
        for _ in range(300):  # the newest replica is the one drained and stopped
            if await cluster.endpoints("sim") == [old] and cluster.settled("sim"):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"not scaled down: {await cluster.endpoints('sim')}")
        r = await c.post(f"http://{old.host_port}/v1/completions", json=body)
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == full
        assert _sources((await c.get(f"http://{old.host_port}/metrics")).text)["disk"] == full


@pytest.mark.integration
async def test_a_new_replica_is_warmed_with_the_prompts_the_scheduler_learned(
    tmp_path: Path,
) -> None:
    """No list to maintain: chats through Envoy + llmd-scheduler teach it the pool's system
    prompt; the activator reads /debug/hot-prompts when a replica joins and warms it."""
    cluster = LocalCluster({"sim": SimLauncher()}, tmp_path / "endpoints.yaml", tmp_path)
    await cluster.scale("sim", 1)
    await cluster.wait_ready("sim", 60)
    (first,) = await cluster.endpoints("sim")
    gateway = await asyncio.to_thread(
        Gateway.start,
        cluster.discovery_file,
        tmp_path / "gw",
        scheduler_args=["--debug-token", "s3"],
    )
    system = {"role": "system", "content": HOT}
    app: ActivatorApp | None = None
    try:
        async with httpx.AsyncClient(timeout=30) as c:
            for i in range(3):
                r = await c.post(
                    gateway.url + "/v1/chat/completions",
                    json={"model": "tiny", "max_tokens": 1,
                          "messages": [system, {"role": "user", "content": f"question {i}"}]},
                )  # fmt: skip
                assert r.status_code == 200, r.text
            url = gateway.scheduler.debug_url + "/debug/hot-prompts"
            assert (await c.get(url)).status_code == 401  # behind the debug token
            r = await c.get(url, headers={"authorization": "Bearer s3"})
            learned = r.json()["prompts"]
            assert [p["messages"] for p in learned] == [[system]]
            assert learned[0]["requests"] == 3
            assert learned[0]["model"] == "tiny"

            cfg = ActivatorConfig.model_validate(
                {"pool": "sim", "host": "127.0.0.1", "http_port": free_port(),
                 "warm_prompts_url": url, "warm_prompts_token": "s3"}
            )  # fmt: skip
            app = ActivatorApp(cfg, cluster)
            await app.start()
            await asyncio.wait_for(app.activator.synced.wait(), 10)
            assert f"up to 8 learned from {url}" in app.describe()
            await cluster.scale("sim", 2)
            reg = app.registry
            for _ in range(300):
                if reg.get_sample_value("llmd_activator_warmed_replicas_total", {"pool": "sim"}):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the new replica was not warmed")
            assert (
                reg.get_sample_value("llmd_activator_warm_learned_prompts_total", {"pool": "sim"})
                == 1
            )
            assert (
                reg.get_sample_value(
                    "llmd_activator_warm_requests_total", {"pool": "sim", "outcome": "ok"}
                )
                == 1
            )
            assert not reg.get_sample_value(
                "llmd_activator_warm_prompt_fetch_errors_total", {"pool": "sim"}
            )
            computed = reg.get_sample_value(
                "llmd_activator_warm_prompt_tokens_total", {"pool": "sim", "source": "computed"}
            )
            assert (computed or 0) > 500  # no FS tier here: the warm-up computed it
            # a user's chat on the new replica finds the system prompt in its prefix cache
            (new,) = [e for e in await cluster.endpoints("sim") if e != first]
            r = await c.post(
                f"http://{new.host_port}/v1/chat/completions",
                json={"model": "tiny", "max_tokens": 1,
                      "messages": [system, {"role": "user", "content": "where is my order?"}]},
            )  # fmt: skip
            assert r.status_code == 200, r.text
            cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached >= computed // 16 * 16 - 16
    finally:
        if app is not None:
            await app.stop()
        await asyncio.to_thread(gateway.stop)
        await cluster.close()


async def test_a_failed_read_of_learned_prompts_is_counted_and_the_file_still_sent(
    tmp_path: Path,
) -> None:
    """The scheduler is unreachable, then answers garbage: each read is counted, nothing
    learned is sent, and the file's prompt goes out as before."""
    warm = tmp_path / "warm.yaml"
    warm.write_text("- hello there\n")
    reg = CollectorRegistry()
    dead = f"http://127.0.0.1:{free_port()}/debug/hot-prompts"
    w = Warmer("p", load_warm_prompts(str(warm), "tiny"), registry=reg, learned_url=dead)
    w._session = aiohttp.ClientSession()
    try:
        assert await w.fetch_learned() == []
        fetch_errors = ("llmd_activator_warm_prompt_fetch_errors_total", {"pool": "p"})
        assert reg.get_sample_value(*fetch_errors) == 1
        # a server that answers, but not with hot prompts
        web_app = aiohttp.web.Application()
        answers = iter(
            [
                b"not json",
                b'{"prompts": "no"}',
                b'{"prompts": [{"messages": []}, '
                b'{"model": "tiny", "messages": [{"role": "system", "content": "x"}]}]}',
            ]
        )

        async def handler(_: aiohttp.web.Request) -> aiohttp.web.Response:
            return aiohttp.web.Response(body=next(answers), content_type="application/json")

        web_app.router.add_get("/debug/hot-prompts", handler)
        runner = aiohttp.web.AppRunner(web_app)
        await runner.setup()
        port = free_port()
        await aiohttp.web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            w.learned_url = f"http://127.0.0.1:{port}/debug/hot-prompts"
            assert await w.fetch_learned() == []
            assert await w.fetch_learned() == []
            (one,) = await w.fetch_learned()  # the bad item is skipped, the good one kept
            assert one.path == "/v1/chat/completions"
            assert reg.get_sample_value(*fetch_errors) == 4
        finally:
            await runner.cleanup()
    finally:
        await w.aclose()
