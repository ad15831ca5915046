"""llmd-sim's configuration: vLLM's own option names where vLLM has the option, typed and checked.

A YAML file (`--config`) holds these fields; command-line flags override it. Every invalid
field is reported with its path (llmd.runtime.config).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from llmd.protocol.hashing import HashAlgo
from llmd.runtime.config import StrictModel
from llmd.sim.latency import DEFAULT_PROFILE, PROFILES, LatencyProfile
from llmd.sim.storage import StorageConfig


class KVEventsConfig(StrictModel):
    """vLLM's --kv-events-config (JSON)."""

    enable_kv_cache_events: bool = False
    publisher: Literal["zmq", "null"] = "zmq"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = Field(default=10_000, gt=0)
    hwm: int = Field(default=100_000, gt=0)
    max_queue_size: int = Field(default=100_000, gt=0)
    topic: str = ""


class KVTransferConfig(StrictModel):
    """vLLM's --kv-transfer-config (JSON); NixlConnector is the connector simulated."""

    kv_connector: str | None = None
    kv_role: Literal["kv_producer", "kv_consumer", "kv_both"] | None = None
    engine_id: str | None = None
    kv_buffer_device: str | None = None
    kv_port: int = 14579
    kv_connector_extra_config: dict[str, Any] = Field(default_factory=dict)
    kv_connector_module_path: str | None = None
    enable_permute_local_kv: bool = False
    kv_load_failure_policy: Literal["fail", "recompute"] = "fail"

    @model_validator(mode="after")
    def _role_required(self) -> KVTransferConfig:
        if self.kv_connector is not None and self.kv_role is None:
            raise ValueError("kv_role is required when kv_connector is set")
        if self.kv_connector not in (None, "NixlConnector", "NixlPullConnector"):
            raise ValueError(f"llmd-sim simulates NixlConnector only, not {self.kv_connector!r}")
        return self

    @property
    def lease_s(self) -> float:
        return float(self.kv_connector_extra_config.get("kv_lease_duration", 30))


class ECTransferConfig(StrictModel):
    """vLLM's --ec-transfer-config (JSON): where encoder outputs go (E/P/D). A producer
    (`ec_producer`, an encode pod) answers each multimodal item with `ec_transfer_params`; a
    consumer (`ec_consumer`, a prefill or decode pod) skips encoding the items a request's
    `ec_transfer_params` name."""

    ec_connector: str | None = None
    ec_role: Literal["ec_producer", "ec_consumer", "ec_both"] | None = None
    engine_id: str | None = None
    ec_buffer_device: str | None = None
    ec_connector_extra_config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _role_required(self) -> ECTransferConfig:
        if self.ec_connector is not None and self.ec_role is None:
            raise ValueError("ec_role is required when ec_connector is set")
        return self

    @property
    def produces(self) -> bool:
        return self.ec_connector is not None and self.ec_role in ("ec_producer", "ec_both")

    @property
    def consumes(self) -> bool:
        return self.ec_connector is not None and self.ec_role in ("ec_consumer", "ec_both")


class LoraModule(StrictModel):
    """A LoRA adapter loaded at start (`--lora-modules name=path`)."""

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


class FaultConfig(StrictModel):
    """Failures on demand (also settable at run time: POST /sim/faults)."""

    startup_delay_s: float = Field(default=0.0, ge=0)
    """Seconds before the port accepts connections (a slow start)."""
    error_rate: float = Field(default=0.0, ge=0, le=1)
    """Share of inference requests answered with HTTP 500."""
    drop_events_rate: float = Field(default=0.0, ge=0, le=1)
    """Share of KV-event batches not sent (the sequence still advances: a gap)."""
    crash_after_requests: int | None = Field(default=None, ge=0)
    """Die (close the port, drop connections) after this many inference requests."""
    hang_after_requests: int | None = Field(default=None, ge=0)
    """Stop stepping (requests stall, /health stays 200) after this many requests."""
    metrics_error_rate: float = Field(default=0.0, ge=0, le=1)
    """Share of /metrics scrapes answered with HTTP 500 (a metrics outage; serving goes on)."""


class SimServerConfig(StrictModel):
    """One simulated vLLM server (a fleet repeats it on consecutive ports)."""

    model: str = "tiny"
    """A model directory with a tokenizer, or a bare name (then --tokenizer or the tiny one)."""
    tokenizer: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    pod_name: str | None = None
    block_size: int = Field(default=16, gt=0)
    num_gpu_blocks_override: int | None = Field(default=None, gt=1)
    max_num_seqs: int = Field(default=256, gt=0)
    max_num_batched_tokens: int = Field(default=8192, gt=0)
    max_model_len: int | None = Field(default=None, gt=0)
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: HashAlgo = "sha256"
    hash_seed: str | None = None
    """NONE_HASH seed; PYTHONHASHSEED's value when not given, as on vLLM."""
    enable_prompt_tokens_details: bool = False
    max_waiting_requests: int = Field(default=100_000, gt=0)
    enable_lora: bool = False
    max_loras: int = Field(default=1, gt=0)
    max_lora_rank: int = Field(default=16, gt=0)
    lora_modules: list[LoraModule] = Field(default_factory=list)
    allow_runtime_lora_updating: bool = False
    kv_events_config: KVEventsConfig | None = None
    kv_transfer_config: KVTransferConfig | None = None
    ec_transfer_config: ECTransferConfig | None = None
    side_channel_host: str = "127.0.0.1"
    side_channel_port: int = Field(default=5600, ge=0, le=65535)
    metrics_dialect: Literal["vllm", "sglang"] = "vllm"
    """Whose metric names /metrics serves: vLLM's, or SGLang's (to test engine mappings)."""
    profile: str = DEFAULT_PROFILE
    latency: dict[str, float] = Field(default_factory=dict)
    """Coefficient overrides on top of the profile, e.g. {prefill_token_s: 5e-5}."""
    speed: float = Field(default=1.0, gt=0)
    noise: float = Field(default=0.0, ge=0, lt=1)
    seed: int = 0
    faults: FaultConfig = FaultConfig()
    storage: StorageConfig | None = None
    """A shared filesystem KV tier (llmd-fs-offload) this engine mounts."""

    @field_validator("kv_events_config", "kv_transfer_config", "ec_transfer_config", mode="before")
    @classmethod
    def _json_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
        return value

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value not in PROFILES:
            raise ValueError(f"unknown profile {value!r}; known: {', '.join(sorted(PROFILES))}")
        return value

    @model_validator(mode="after")
    def _lora_needs_enable(self) -> SimServerConfig:
        if self.lora_modules and not self.enable_lora:
            raise ValueError("lora_modules needs enable_lora")
        return self

    def latency_profile(self) -> LatencyProfile:
        """The named profile with the user's coefficient overrides applied."""
        base = PROFILES[self.profile]
        if not self.latency:
            return base
        return LatencyProfile.model_validate({**base.model_dump(), **self.latency})

    def num_gpu_blocks(self) -> int:
        """Explicit capacity, or the profile's (given in 16-token blocks) at this block size."""
        if self.num_gpu_blocks_override is not None:
            return self.num_gpu_blocks_override
        tokens = self.latency_profile().default_num_gpu_blocks * 16
        return max(tokens // self.block_size, 2)
