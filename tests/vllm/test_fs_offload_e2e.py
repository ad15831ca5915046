"""The llmd FS tier inside two real vLLM CPU servers that share one directory.

A prompt served by A is stored as files; B, which never saw it, loads those files (its
`cached_tokens` cover them) and answers exactly as A did. A flipped byte, a truncated file and a
deleted file each make B recompute the affected chunks, answer the same, and count why.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

import llmd.fs_offload
from llmd.dev.gateway import SchedulerProcess
from llmd.fs_offload.evictor_service import EvictorConfig, build
from llmd.fs_offload.fileformat import HEADER_SIZE
from llmd.fs_offload.vllm_args import vllm_args
from llmd.vllm_cpu.install import VllmEnv
from llmd.vllm_cpu.server import VllmServer, VllmServerSpec, free_port, running_servers

pytestmark = pytest.mark.vllm

TOKENS_PER_FILE = 64  # two 32-token vLLM blocks per file
STORAGE_SCORE = 0.7
"""A prompt wholly on the volume scores its storage weight: the 0.8 prior, or what is measured."""
DOMAIN = "vol"
PLUGIN_PATH = str(Path(llmd.fs_offload.__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-kv")


@pytest.fixture(scope="module")
def pair(
    vllm_env: VllmEnv,
    tiny_model_dir: Path,
    shared_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[VllmServer, VllmServer]]:
    extra = {"threads_per_gpu": 2, "storage_domain": DOMAIN}
    args = vllm_args(shared_dir, block_size=TOKENS_PER_FILE, extra=extra)
    specs = [
        VllmServerSpec(
            pod=pod,
            model_dir=tiny_model_dir,
            cpu_core=i,
            extra_args=args,
            env={"PYTHONPATH": PLUGIN_PATH, "VLLM_SERVER_DEV_MODE": "1"},  # /reset_prefix_cache
        )
        for i, pod in enumerate(("fs-a", "fs-b"))
    ]
    with running_servers(vllm_env, specs, tmp_path_factory.mktemp("fs-logs")) as servers:
        yield servers[0], servers[1]


def complete(server: VllmServer, prompt: str) -> tuple[str, int, int]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=180)
    assert r.status_code == 200, r.text
    out = r.json()
    usage = out["usage"]
    return (
        out["choices"][0]["text"],
        usage["prompt_tokens"],
        usage["prompt_tokens_details"]["cached_tokens"],
    )


def chunk_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*.bin") if p.is_file()}


def wait_files(root: Path, before: set[Path], expect: int, timeout_s: float = 60) -> set[Path]:
    """The files written since `before`, once `expect` of them exist."""
    deadline = time.monotonic() + timeout_s
    while True:
        new = chunk_files(root) - before
        if len(new) >= expect or time.monotonic() > deadline:
            return new
        time.sleep(0.2)


def metric(server: VllmServer, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_metric(
    server: VllmServer, name: str, at_least: float, timeout_s: float = 30, **labels: str
) -> float:
    deadline = time.monotonic() + timeout_s
    while (value := metric(server, name, **labels)) < at_least and time.monotonic() < deadline:
        time.sleep(0.5)
    return value


def prompt(tag: str, words: int = 300) -> str:
    return " ".join(f"{tag}{i}" for i in range(words))


def stored_tokens(prompt_tokens: int) -> int:
    """Tokens in whole files: vLLM stores complete chunks of the prompt only."""
    return (prompt_tokens - 1) // TOKENS_PER_FILE * TOKENS_PER_FILE


def test_b_serves_a_prompt_from_files_a_wrote(
    pair: tuple[VllmServer, VllmServer], shared_dir: Path
) -> None:
    a, b = pair
    p = prompt("shared")
    before = chunk_files(shared_dir)
    text_a, n, cached_a = complete(a, p)
    assert cached_a == 0
    files = wait_files(shared_dir, before, stored_tokens(n) // TOKENS_PER_FILE)
    assert len(files) == stored_tokens(n) // TOKENS_PER_FILE, f"{len(files)} files for {n} tokens"
    for f in files:
        assert f.stat().st_size > HEADER_SIZE
    text_b, n_b, cached_b = complete(b, p)
    assert n_b == n
    assert cached_b >= stored_tokens(n), f"B reused {cached_b} of {stored_tokens(n)} stored tokens"
    assert text_b == text_a
    assert wait_metric(b, "vllm:kv_offload_load_bytes_total", 1) > 0


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[HEADER_SIZE + len(data[HEADER_SIZE:]) // 3] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1000)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(_flip, "checksum"), (_truncate, "truncated"), (Path.unlink, None)],
    ids=["flipped-byte", "truncated", "deleted"],
)
def test_a_damaged_file_is_recomputed_never_served(
    pair: tuple[VllmServer, VllmServer], shared_dir: Path, damage: object, reason: str | None
) -> None:
    a, b = pair
    p = prompt(re.sub(r"[^a-z]", "", getattr(damage, "__name__", "x"))[:4])
    before = chunk_files(shared_dir)
    text_a, n, _ = complete(a, p)
    files = sorted(wait_files(shared_dir, before, stored_tokens(n) // TOKENS_PER_FILE))
    assert files
    victim = files[len(files) // 2]
    assert callable(damage)
    damage(victim)
    failures = metric(b, "llmd_fs_offload_load_failures_total", reason=reason) if reason else 0.0
    misses = metric(b, "llmd_fs_offload_lookups_total", result="miss")
    text_b, _, cached_b = complete(b, p)
    assert text_b == text_a, "B's answer differs from A's after a damaged file"
    if reason is not None:
        # vLLM's usage still counts the refused chunk's tokens as cached (it does not lower
        # cached_tokens when it recomputes blocks reported as load errors); the counter, the
        # log line and the removed file say what happened.
        assert (
            wait_metric(b, "llmd_fs_offload_load_failures_total", failures + 1, reason=reason)
            >= failures + 1
        )
        assert not victim.exists(), "a refused file must be removed"
    else:
        assert cached_b < stored_tokens(n), "a deleted chunk cannot have been reused"
        assert (
            wait_metric(b, "llmd_fs_offload_lookups_total", misses + 1, result="miss") >= misses + 1
        )


SCHEDULER_CONFIG = """
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenizer: {{modelDir: "{model_dir}"}}
    kvEventsConfig: {{zmqEndpoint: "tcp://127.0.0.1:{port}"}}
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: prefix-cache-scorer, weight: 1}}]
"""


def _explain_scores(
    sched: SchedulerProcess, p: str, done: Callable[[dict[str, float]], bool]
) -> dict[str, float]:
    """The prefix scorer's scores per endpoint, polled until `done` says so (or 30 s)."""
    scores: dict[str, float] = {}
    deadline = time.monotonic() + 30
    while True:
        r = httpx.post(
            sched.debug_url + "/debug/explain",
            json={"body": {"model": "tiny", "prompt": p}},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        scores = r.json()["profiles"]["default"]["scores"]["prefix-cache-scorer"]["per_endpoint"]
        if done(scores) or time.monotonic() > deadline:
            return scores
        time.sleep(0.3)


def test_the_scheduler_routes_to_a_pod_of_the_storage_domain(
    pair: tuple[VllmServer, VllmServer], shared_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A's tier stores a prompt. The scheduler, following both engines' KV events, sees its
    blocks on the storage tier of domain `vol`: B, labelled with the domain, scores the prompt
    although it never saw it (and without the label scores nothing); B then answers from the
    files. The evictor, under pressure, removes the files and its BlockRemoved events (sent to
    the scheduler's event socket) take B's score away again."""
    a, b = pair
    p = prompt("route")
    before = chunk_files(shared_dir)
    text_a, n, _ = complete(a, p)
    wait_files(shared_dir, before, stored_tokens(n) // TOKENS_PER_FILE)
    central = free_port()

    def start(b_in_domain: bool) -> SchedulerProcess:
        def endpoint(name: str, server: VllmServer, domain: bool) -> dict[str, object]:
            labels = {
                "llmd.ai/kv-events-endpoint": server.kv_events_endpoint,
                "llmd.ai/kv-replay-endpoint": server.replay_endpoint,
            }
            if domain:
                labels["llmd.ai/storage-domain"] = DOMAIN
            return {"name": name, "address": "127.0.0.1", "port": server.port, "labels": labels}

        d = tmp_path / f"sched-{b_in_domain}"
        d.mkdir()
        pool = d / "pool.yaml"
        pool.write_text(
            yaml.safe_dump({"endpoints": [endpoint("a", a, True), endpoint("b", b, b_in_domain)]})
        )
        config = d / "epp.yaml"
        config.write_text(SCHEDULER_CONFIG.format(model_dir=tiny_model_dir, port=central))
        return SchedulerProcess.start(pool, d, config_file=config)

    control = start(b_in_domain=False)
    try:
        scores = _explain_scores(control, p, lambda s: s.get("a", 0) > 0.9)
        assert scores["a"] > 0.9, scores
        assert scores["b"] < 0.1, f"B has no claim on the volume without its label: {scores}"
    finally:
        control.stop()
    sched = start(b_in_domain=True)
    try:
        # B's blocks are on the volume: they count at the storage tier's weight (0.8 until the
        # scheduler has measured reload against recompute on these engines)
        scores = _explain_scores(sched, p, lambda s: s.get("b", 0) > STORAGE_SCORE)
        assert scores["b"] > STORAGE_SCORE, f"the storage domain's blocks did not reach B: {scores}"
        text_b, _, cached_b = complete(b, p)
        assert text_b == text_a
        assert cached_b >= stored_tokens(n)
        # another prompt, stored by A only; then pressure: the evictor removes every file
        # and tells the scheduler's event socket
        q = prompt("evict")
        before = chunk_files(shared_dir)
        _, nq, _ = complete(a, q)
        wait_files(shared_dir, before, stored_tokens(nq) // TOKENS_PER_FILE)
        assert (
            _explain_scores(sched, q, lambda s: s.get("b", 0) > STORAGE_SCORE)["b"] > STORAGE_SCORE
        )
        removed = asyncio.run(_evict_all(shared_dir, f"tcp://127.0.0.1:{central}"))
        assert removed >= stored_tokens(nq) // TOKENS_PER_FILE
        assert not chunk_files(shared_dir)
        scores = _explain_scores(sched, q, lambda s: s.get("b", 1) < 0.1)
        assert scores["b"] < 0.1, f"B still scores evicted files: {scores}"
    finally:
        sched.stop()


async def _evict_all(root: Path, endpoint: str) -> int:
    """llmd-fs-evictor with a quota the volume exceeds, its events connected to `endpoint`."""
    config = EvictorConfig(
        root=str(root),
        capacity_bytes=1 << 40,  # no pressure yet: the first pass removes nothing
        min_age=0,
        interval=3600,
        host="127.0.0.1",
        http_port=0,
        kv_events_endpoint=endpoint,
        model="tiny",
        storage_domain=DOMAIN,
    )
    app = build(config)
    await app.start()
    try:
        await asyncio.sleep(1.0)  # the subscription reaches the publisher (ZMQ slow joiner)
        app.evictor.capacity_bytes = 1 << 20
        app.evictor.low = 0.0001
        report = await app.run_pass()
        assert report is not None
        return len(report.removed)
    finally:
        await app.stop()


def test_the_torch_page_mover_round_trips_scattered_blocks(vllm_env: VllmEnv) -> None:
    """Runs of consecutive block ids, repeated ids, two groups, rows wider than their pages."""
    out = subprocess.run(
        [str(vllm_env.python), str(Path(__file__).with_name("fs_pages_round_trip.py"))],
        env={**os.environ, "PYTHONPATH": PLUGIN_PATH},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"
