"""What an llm-d EndpointPickerConfig may say that llmd reads differently, and what it lacks.

`prepare()` runs before any plugin is built. It

- names the llm-d plugin types llmd does not have (`UNAVAILABLE`, grouped by feature), so a
  config using one is rejected with the feature it needs instead of "unknown plugin type";
- expands llm-d's deprecated wrapper `precise-prefix-cache-scorer` into the producer and
  `prefix-cache-scorer` it stands for;
- moves parameters that older llm-d releases accepted to where llmd reads them, with one
  deprecation warning each (`prefix-cache-scorer`'s `maxPrefixBlocksToMatch` and
  `lruCapacityPerServer` go to the approximate producer it creates, `no-hit-lru-scorer`'s
  `prefixPluginName` becomes `prefixMatchInfoProducerName`, the precise producer's
  `tokenProcessorConfig.blockSize` becomes `blockSizeTokens`);
- gives the precise producer its tokenizer from the config's `token-producer` (a vLLM render
  server) or from `indexerConfig.tokenizersPoolConfig` (a tokenizer directory under the
  Hugging Face cache directory), and refuses, with the reason, the sources llmd cannot use
  (a UDS tokenizer sidecar, a download from the Hub, the byte estimate).

Parameters llm-d accepts but that change nothing in llmd are dropped with one warning each.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmd.runtime.config import ConfigIssue

log = logging.getLogger(__name__)

_PD = "P/D disaggregation (the llm-d sidecar path)"
_MM = "multimodal encoder-cache affinity"
_MULTI = "multi-cluster routing"
_TOPOLOGY = "topology-aware routing"
_DCGM = "GPU (DCGM) metrics"
_ATTR = "routing on custom endpoint attributes"
_ADMIT = "admission plugins"

UNAVAILABLE: dict[str, str] = {
    # profile handlers, deciders and P/D headers
    "header-profile-handler": "header-selected scheduling profiles",
    "pd-slo-pair-optimizer": _PD + " with SLO pair optimisation",
    "pd-slo-profile-handler": _PD + " with SLO pair optimisation",
    "dp-rank-header-handler": "rank pinning in vLLM's internal data-parallel balancer "
    "(X-data-parallel-rank)",
    "disaggregatedset-rollout-screener": "DisaggregatedSet rollouts",
    # filters and scorers
    "session-affinity-filter": "session pinning as a filter",
    "endpoint-attribute-filter": _ATTR,
    "endpoint-attribute-scorer": _ATTR,
    "topology-affinity-filter": _TOPOLOGY,
    "topology-affinity-scorer": _TOPOLOGY,
    "topology-extractor": _TOPOLOGY,
    "multicluster-session-affinity-filter": _MULTI,
    "multicluster-queue-scorer": _MULTI,
    "multicluster-kv-cache-utilization-scorer": _MULTI,
    "multicluster-prefix-cache-scorer": _MULTI,
    "multicluster-approx-prefix-cache-producer": _MULTI,
    "multicluster-metrics-data-source": _MULTI,
    "multicluster-metrics-extractor": _MULTI,
    "multicluster-file-discovery": _MULTI,
    "context-length-aware": "context-length-aware routing",
    "header-label-affinity-scorer": "header-to-label affinity",
    "mm-embeddings-cache-producer": _MM,
    "mm-embeddings-cache-scorer": _MM,
    # producers and request control
    "session-id-producer": "session ids from headers or cookies as a data producer",
    "burst-prefix-cache-producer": "burst co-location of prompt-sharing requests",
    "p2p-source-producer": "peer-to-peer KV transfer",
    "agent-identity": "agentic program tracking (ThunderAgent)",
    "thunder-agent": "agentic program tracking (ThunderAgent)",
    "probabilistic-admitter": _ADMIT,
    "request-attribute-reporter": "request attribute reporting",
    "models-responder": "an aggregated GET /v1/models across the pool",
    # parsers
    "anthropic-parser": "the Anthropic Messages API parser",
    "vllmhttp-parser": "vLLM's pre-tokenized /inference/v1/generate API",
    "vllmgrpc-parser": "vLLM's gRPC API",
    "sglanghttp-parser": "SGLang's /generate API",
    "vertexai-parser": "the Vertex AI API",
    # data layer
    "dcgm-data-source": _DCGM,
    "dcgm-extractor": _DCGM,
    # conformance-test plugins
    "header-based-testing-filter": "llm-d's conformance-test plugins",
    "destination-endpoint-served-verifier": "llm-d's conformance-test plugins",
}
"""llm-d plugin types llmd does not implement, with the feature each belongs to."""

REMOVED: dict[str, str] = {
    "kvcache-aware-scorer": (
        "llm-d 0.2's KV-cache-aware scorer (configured through environment variables); "
        "its successor is precise-prefix-cache-producer with prefix-cache-scorer"
    ),
}
"""Types that llm-d itself no longer has; the message names the replacement."""

ALIASES: dict[str, str] = {
    "single-profile": "single-profile-handler",
    "max-score": "max-score-picker",
    "random": "random-picker",
    "kv-cache-scorer": "kv-cache-utilization-scorer",
    "by-label": "label-selector-filter",
    "by-label-selector": "label-selector-filter",
}
"""Type names of earlier llm-d releases for plugins llmd has."""


def feature_of(type_name: str) -> str:
    if type_name in REMOVED:
        return f"{type_name} (removed from llm-d)"
    return UNAVAILABLE[type_name]


def missing_message(type_name: str) -> str:
    if type_name in REMOVED:
        return (
            f"{type_name!r} is not supported: {REMOVED[type_name]} (missing feature: "
            f"{feature_of(type_name)})"
        )
    return (
        f"{type_name!r} is an llm-d plugin that llmd does not have yet "
        f"(missing feature: {UNAVAILABLE[type_name]})"
    )


@dataclass
class Spec:
    """One plugin entry as plain data, with where it came from."""

    index: int
    name: str
    type: str
    parameters: dict[str, Any]


@dataclass
class Prepared:
    specs: list[Spec]
    issues: list[ConfigIssue] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    """Plugin name -> the feature it needs (references to it are not reported again)."""
    approx_defaults: dict[str, Any] = field(default_factory=dict)
    """Parameters for an auto-created approximate prefix producer (from legacy scorer keys)."""


_warned: set[str] = set()


def warn(message: str) -> None:
    """Log a compatibility warning once per process."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def _refuse(out: Prepared, name: str, path: str, feature: str, text: str) -> None:
    """Reject plugin `name`: `text` says why, ending with the feature llmd lacks."""
    out.missing[name] = feature
    out.issues.append(ConfigIssue(path, f"{text} (missing feature: {feature})"))


def prepare(raw: list[tuple[int, str | None, str, dict[str, Any] | None]]) -> Prepared:
    """Normalize llm-d plugin entries (index, name, type, parameters) for llmd's builder."""
    out = Prepared(specs=[])
    specs: list[Spec] = []
    for index, name, type_name, params in raw:
        spec_name = name or type_name  # profiles refer to an unnamed plugin by its type as written
        type_name = ALIASES.get(type_name, type_name)
        p = copy.deepcopy(params) if params else {}
        if type_name == "precise-prefix-cache-scorer":
            warn(
                "plugin type 'precise-prefix-cache-scorer' is deprecated (llm-d too): read as "
                "precise-prefix-cache-producer + prefix-cache-scorer"
            )
            producer = f"{spec_name}-producer"
            specs.append(Spec(index, producer, "precise-prefix-cache-producer", p))
            specs.append(
                Spec(
                    index,
                    spec_name,
                    "prefix-cache-scorer",
                    {"prefixMatchInfoProducerName": producer},
                )
            )
            continue
        specs.append(Spec(index, spec_name, type_name, p))

    token_sources = [s for s in specs if s.type in ("token-producer", "tokenizer")]
    for s in specs:
        where = f"plugins[{s.index}].parameters"
        if s.type in UNAVAILABLE or s.type in REMOVED:
            out.missing[s.name] = feature_of(s.type)
            out.issues.append(ConfigIssue(f"plugins[{s.index}].type", missing_message(s.type)))
            continue
        if s.type == "prefix-cache-scorer":
            _prefix_scorer(s, where, out)
        elif s.type == "no-hit-lru-scorer":
            _no_hit_lru(s)
        elif s.type == "approx-prefix-cache-producer":
            _approx(s, where, out)
        elif s.type == "session-affinity-scorer":
            cookie = [k for k in ("maxAge", "secure", "sameSite") if k in s.parameters]
            if cookie:
                _refuse(
                    out,
                    s.name,
                    f"{where}.{cookie[0]}",
                    "cookie-based session affinity",
                    "cookie-based session affinity (the llm-d-session cookie) is not "
                    "available in llmd; use the x-session-id header "
                    "(strategy session_id) or x-session-token "
                    "(strategy encoded_endpoint_header)",
                )
        elif s.type == "precise-prefix-cache-producer":
            _precise(s, where, token_sources, out)
        elif s.type in ("token-producer", "tokenizer"):
            uds = s.parameters.get("udsTokenizerConfig")
            if uds is not None:
                _refuse(
                    out,
                    s.name,
                    f"{where}.udsTokenizerConfig",
                    "UDS tokenizer sidecar",
                    "the gRPC tokenizer sidecar over a Unix socket is not supported by "
                    "llmd (llm-d deprecates it too): give vllm.url, a `vllm launch render` "
                    "server",
                )
    out.specs = specs
    return out


def _prefix_scorer(s: Spec, where: str, out: Prepared) -> None:
    p = s.parameters
    if "mode" in p or "indexerConfig" in p:
        _refuse(
            out,
            s.name,
            f"{where}.mode" if "mode" in p else f"{where}.indexerConfig",
            "prefix-cache-scorer's cache_tracking mode",
            "prefix-cache-scorer's built-in precise mode (mode/indexerConfig, llm-d 0.3) "
            "is not supported: use precise-prefix-cache-producer and set "
            "prefixMatchInfoProducerName",
        )
        return
    for key in ("maxPrefixBlocksToMatch", "lruCapacityPerServer", "maxPrefixTokensToMatch"):
        if key in p:
            out.approx_defaults[key] = p.pop(key)
            warn(
                f"prefix-cache-scorer parameter {key!r} is deprecated: it now configures the "
                "approx-prefix-cache-producer the scorer creates"
            )
    for key in ("hashBlockSize", "blockSize"):
        if key in p:
            value = p.pop(key)
            warn(
                f"prefix-cache-scorer parameter {key!r} (block size in characters, llm-d < 0.3) "
                f"is accepted and ignored (value {value!r}): blocks are counted in tokens"
            )


def _no_hit_lru(s: Spec) -> None:
    p = s.parameters
    ptype = p.pop("prefixPluginType", None)
    pname = p.pop("prefixPluginName", None)
    if ptype is not None or pname is not None:
        warn(
            "no-hit-lru-scorer parameters prefixPluginType/prefixPluginName are deprecated: "
            "read as prefixMatchInfoProducerName"
        )
        if "prefixMatchInfoProducerName" not in p and (pname or ptype):
            p["prefixMatchInfoProducerName"] = pname or ptype


def _approx(s: Spec, where: str, out: Prepared) -> None:
    p = s.parameters
    source = p.pop("prefixHashSource", None)
    if source not in (None, "body"):
        _refuse(
            out,
            s.name,
            f"{where}.prefixHashSource",
            "prefix hashes from request metadata",
            f"prefixHashSource {source!r} (block hashes computed by an upstream ext_proc) "
            "is not available in llmd: only 'body'",
        )
    if "blockSize" in p:
        value = p.pop("blockSize")
        warn(
            "approx-prefix-cache-producer parameter 'blockSize' (characters, deprecated in "
            f"llm-d) is accepted and ignored (value {value!r}): use blockSizeTokens"
        )


def _token_url(token_sources: list[Spec]) -> str | None:
    for t in token_sources:
        vllm = t.parameters.get("vllm")
        backend = t.parameters.get("backend", "vllm" if vllm else "estimate")
        if backend == "vllm" and isinstance(vllm, dict) and vllm.get("url"):
            return str(vllm["url"])
    return None


def _precise(s: Spec, where: str, token_sources: list[Spec], out: Prepared) -> None:
    p = s.parameters
    indexer = p.get("indexerConfig")
    if isinstance(indexer, dict):
        legacy_tp = indexer.pop("tokenProcessorConfig", None)
        if legacy_tp is not None:
            warn(
                "indexerConfig.tokenProcessorConfig is the pre-0.4 place: read as "
                "tokenProcessorConfig"
            )
            p.setdefault("tokenProcessorConfig", legacy_tp)
        block_index = indexer.get("kvBlockIndexConfig")
        if isinstance(block_index, dict):
            for key in ("metricsLoggingInterval", "maxPrefixTokensToMatch"):
                if key in block_index:
                    block_index.pop(key)
                    warn(
                        f"kvBlockIndexConfig.{key} is accepted and ignored: llmd exports the "
                        "index's metrics continuously and matches whole prompts"
                    )
        pool = indexer.pop("tokenizersPoolConfig", None)
    else:
        pool = None
    tp = p.get("tokenProcessorConfig")
    if isinstance(tp, dict) and "blockSize" in tp:
        tp.setdefault("blockSizeTokens", tp.pop("blockSize"))
    if "tokenizer" in p:
        return
    url = _token_url(token_sources)
    if url is not None:
        p["tokenizer"] = {"renderUrl": url}
        return
    if isinstance(pool, dict):
        if pool.get("uds") is not None:
            _refuse(
                out,
                s.name,
                f"{where}.indexerConfig.tokenizersPoolConfig.uds",
                "UDS tokenizer sidecar",
                "the gRPC tokenizer sidecar over a Unix socket is not supported by llmd: "
                "add a token-producer with vllm.url (a `vllm launch render` server) or "
                "give tokenizer.modelDir",
            )
            return
        model = pool.get("modelName")
        hf = pool.get("hf") if isinstance(pool.get("hf"), dict) else {}
        cache = (hf or {}).get("tokenizersCacheDir")
        if model and cache and (Path(cache) / str(model) / "tokenizer.json").is_file():
            p["tokenizer"] = {"modelDir": str(Path(cache) / str(model))}
            return
        looked = f" (no {Path(cache) / str(model)}/tokenizer.json)" if model and cache else ""
        _refuse(
            out,
            s.name,
            f"{where}.indexerConfig.tokenizersPoolConfig",
            "tokenizer download from the Hugging Face Hub",
            f"llmd does not download tokenizers{looked}: put the tokenizer files there, "
            "give tokenizer.modelDir, or add a token-producer with vllm.url",
        )
        return
    _refuse(
        out,
        s.name,
        where,
        "precise prefix matching on estimated tokens",
        "precise-prefix-cache-producer needs the engine's real token ids: add a "
        "token-producer with backend vllm and vllm.url (a `vllm launch render` server), or "
        "give tokenizer.modelDir. (llm-d would fall back to its byte estimate, whose "
        "pseudo-tokens never match an engine's KV events, so every lookup would miss.)",
    )
