"""Warm start: a replica that joins the pool gets the hot prompts from the shared FS tier before
the first user request for them, on real engine processes (simulated vLLM) sharing a volume."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from llmd.activator.app import ActivatorApp, ActivatorConfig
from llmd.activator.warm import load_warm_prompts
from llmd.dev.cluster import LocalCluster, SimLauncher
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
