"""Which engine's metric names each endpoint is read with, and the data-layer plugin settings.

llm-d's `core-metrics-extractor` reads vLLM, SGLang, trtllm-serve, Triton TensorRT-LLM and
Triton metric names. The engine of an endpoint is its `llm-d.ai/engine-type` label (legacy
`inference.networking.k8s.io/engine-type`), else `defaultEngine` (`vllm`). `engineConfigs`
adds engines or overrides one's metric specs. An engine nobody defined is an error: at load
for `defaultEngine`, and for an endpoint label the endpoint's scrapes fail with the reason
(the endpoint goes stale and leaves the candidates) instead of being read as all zeros.

`metrics-data-source` takes `scheme`, `path` and `insecureSkipVerify`; llmd scrapes over plain
HTTP, so `scheme: https` is refused with that reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from llmd.protocol.metrics import ENGINES, EngineDialect, MetricSpec
from llmd.runtime.config import ConfigIssue, StrictModel
from llmd.scheduler.compat import warn

ENGINE_LABELS = ("llm-d.ai/engine-type", "inference.networking.k8s.io/engine-type")


class MetricsSourceParams(StrictModel):
    scheme: Literal["http", "https"] = "http"
    path: str = Field(default="/metrics", pattern=r"^/[^\s?#]*$")
    insecure_skip_verify: bool = Field(default=True, alias="insecureSkipVerify")
    port: int | None = Field(default=None, gt=0, lt=65536)

    @field_validator("scheme")
    @classmethod
    def _http(cls, v: str) -> str:
        if v == "https":
            raise ValueError(
                "scraping model servers over HTTPS is not available in llmd (plain HTTP only)"
            )
        return v


class EngineConfig(StrictModel):
    name: str = Field(min_length=1)
    queued_requests_spec: str | None = Field(default=None, alias="queuedRequestsSpec")
    running_requests_spec: str | None = Field(default=None, alias="runningRequestsSpec")
    kv_usage_spec: str | None = Field(default=None, alias="kvUsageSpec")
    cache_info_spec: str | None = Field(default=None, alias="cacheInfoSpec")
    block_size_label: str | None = Field(default=None, alias="blockSizeLabel")
    num_blocks_label: str | None = Field(default=None, alias="numBlocksLabel")

    @field_validator(
        "queued_requests_spec", "running_requests_spec", "kv_usage_spec", "cache_info_spec"
    )
    @classmethod
    def _spec(cls, v: str | None) -> str | None:
        if v is not None:
            MetricSpec.parse(v)
        return v

    def dialect(self, base: EngineDialect | None) -> EngineDialect:
        d = base or EngineDialect(self.name)
        changes: dict[str, Any] = {"name": self.name}
        for attr, value in (
            ("waiting", self.queued_requests_spec),
            ("running", self.running_requests_spec),
            ("kv_usage", self.kv_usage_spec),
            ("cache_info", self.cache_info_spec),
        ):
            if value is not None:
                changes[attr] = MetricSpec.parse(value)
        if self.block_size_label is not None:
            changes["block_size_label"] = self.block_size_label
        if self.num_blocks_label is not None:
            changes["num_blocks_label"] = self.num_blocks_label
        return replace(d, **changes)


class ExtractorParams(StrictModel):
    default_engine: str = Field(default="vllm", alias="defaultEngine")
    engine_configs: list[EngineConfig] = Field(default_factory=list, alias="engineConfigs")


@dataclass(frozen=True)
class DataLayerSettings:
    """How endpoints are scraped and read."""

    default_engine: str = "vllm"
    engines: Mapping[str, EngineDialect] = field(default_factory=lambda: dict(ENGINES))
    metrics_path: str = "/metrics"

    def dialect_for(self, labels: Mapping[str, str]) -> EngineDialect:
        """The dialect of an endpoint with these labels; ValueError for an unknown engine."""
        kind = next((labels[k] for k in ENGINE_LABELS if labels.get(k)), self.default_engine)
        dialect = self.engines.get(kind)
        if dialect is None:
            raise ValueError(
                f"engine type {kind!r} has no metric mapping (known: "
                f"{', '.join(sorted(self.engines))}; add it under core-metrics-extractor "
                "engineConfigs)"
            )
        return dialect


def _validated(
    model: type[StrictModel], params: dict[str, Any], where: str, issues: list[ConfigIssue]
) -> Any:
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            issues.append(ConfigIssue(f"{where}.parameters{'.' + loc if loc else ''}", err["msg"]))
        return None


def datalayer_settings(
    params: dict[str, tuple[str, dict[str, Any]]],
    types: Mapping[str, str],
    issues: list[ConfigIssue],
) -> DataLayerSettings:
    """Settings from the data-layer plugin entries (name -> (YAML path, parameters))."""
    settings = DataLayerSettings()
    for name, (where, p) in params.items():
        kind = types[name]
        if kind == "metrics-data-source":
            src = _validated(MetricsSourceParams, p, where, issues)
            if src is not None:
                if src.port is not None:
                    issues.append(
                        ConfigIssue(
                            f"{where}.parameters.port",
                            "a metrics port other than the serving port is not available in "
                            "llmd yet",
                        )
                    )
                settings = replace(settings, metrics_path=src.path)
        elif kind == "core-metrics-extractor":
            ext = _validated(ExtractorParams, p, where, issues)
            if ext is None:
                continue
            engines = dict(settings.engines)
            for cfg in ext.engine_configs:
                engines[cfg.name] = cfg.dialect(engines.get(cfg.name))
            if ext.default_engine not in engines:
                issues.append(
                    ConfigIssue(
                        f"{where}.parameters.defaultEngine",
                        f"unknown engine {ext.default_engine!r} (known: "
                        f"{', '.join(sorted(engines))}; define it under engineConfigs)",
                    )
                )
                continue
            settings = replace(settings, default_engine=ext.default_engine, engines=engines)
        elif p and kind == "file-discovery":
            warn(
                f"{where}.parameters: file-discovery's parameters are ignored; llmd-scheduler "
                "reads its discovery file from --discovery-file (watched for changes)"
            )
        elif p:
            warn(f"{where}.parameters of {kind} are accepted and ignored by llmd")
    return settings
