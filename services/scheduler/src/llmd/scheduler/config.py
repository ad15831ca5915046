"""`EndpointPickerConfig` (llm-d.ai/v1alpha1): the schema, llm-d's defaults, and the builder
that turns a document into ready plugin instances and scheduling profiles.

Every problem is reported at once with its YAML path (`plugins[2].parameters.threshold: ...`).
Accepted but not acted on (logged once): `featureGates`, `flowControl`, `dataLayer.sources`,
`dataLayer.peerDiscovery`, cross-replica sync. `llmd:` holds this implementation's own settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from llmd.runtime.config import (
    ConfigError,
    ConfigIssue,
    StrictModel,
    parse_duration,
    yaml_mapping,
)
from llmd.scheduler import compat
from llmd.scheduler.engines import DataLayerSettings, datalayer_settings
from llmd.scheduler.flowcontrol import (
    EvictionFilter,
    EvictionOrder,
    FairnessPolicy,
    FlowControlSpec,
    OrderingPolicy,
    SaturationDetector,
    UsageLimitPolicy,
)
from llmd.scheduler.framework import (
    Admitter,
    DataProducer,
    Filter,
    Picker,
    Plugin,
    PluginHandle,
    PluginRegistry,
    PreRequest,
    ProfileHandler,
    ResponseHook,
    Scorer,
)

log = logging.getLogger(__name__)

API_VERSIONS = ("llm-d.ai/v1alpha1", "llm-d.ai/v1", "inference.networking.x-k8s.io/v1alpha1")
MAX_CONFIG_BYTES = 1024 * 1024

DEFAULT_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: utilization-filter
  name: overload-filter
  parameters:
    conditions:
    - metric: waiting-queue
      maxValue: 16
    fallbackOnEmpty: true
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: overload-filter
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
flowControl:
  noEndpointRequestTTL: 5s
"""
"""llm-d's optimized baseline (queue 2, kv 2, prefix 3) plus an overload filter: an endpoint
with more than 16 waiting requests (scraped, plus those sent since the scrape) leaves the
candidates unless every endpoint is that loaded, so a hot prefix spreads instead of piling onto
its cache holder (a reported llm-d problem). Without config llmd also counts each request
against its endpoint at pick time and breaks ties by outstanding work (the herding fix), and
flow control is on with llm-d's default policies: below saturation it costs one saturation
reading per request (24 us), at overload it serves priorities in order
(`benchmarks/flow_control.py`); a request that finds the pool empty waits 5 s for an endpoint,
then gets 503. llm-d configs keep llm-d's default: off without the gate."""

Duration = str | float


class PluginSpec(StrictModel):
    name: str | None = None
    type: str = Field(min_length=1)
    parameters: dict[str, Any] | None = None


class ProfilePluginRef(StrictModel):
    plugin_ref: str = Field(alias="pluginRef", min_length=1)
    weight: float | None = None  # checked in build() so it is reported with the other issues


class ProfileSpec(StrictModel):
    name: str = Field(min_length=1)
    plugins: list[ProfilePluginRef] = Field(default_factory=list)


class PluginRefSpec(StrictModel):
    plugin_ref: str = Field(alias="pluginRef", min_length=1)


class DataSourceSpec(StrictModel):
    plugin_ref: str = Field(alias="pluginRef")
    extractors: list[PluginRefSpec] = Field(default_factory=list)


class DataLayerSpec(StrictModel):
    inject_defaults: bool = Field(default=True, alias="injectDefaults")
    sources: list[DataSourceSpec] = Field(default_factory=list)
    discovery: PluginRefSpec | None = None
    peer_discovery: PluginRefSpec | None = Field(default=None, alias="peerDiscovery")
    cross_replica_syncer_plugin_ref: str | None = Field(
        default=None, alias="crossReplicaSyncerPluginRef"
    )
    cross_replica_sync_interval: Duration | None = Field(
        default=None, alias="crossReplicaSyncInterval"
    )


class RequestHandlerSpec(StrictModel):
    parsers: list[PluginRefSpec] = Field(default_factory=list)


class LlmdOptions(StrictModel):
    """llmd's own settings (not in llm-d's schema)."""

    pick_time_accounting: bool = Field(default=True, alias="pickTimeAccounting")
    """Count a request against its endpoint the moment it is picked (the herding fix). False
    reproduces llm-d, whose load scorers see only scraped metrics."""
    metrics_staleness_threshold: Duration = Field(default="1s", alias="metricsStalenessThreshold")
    """An endpoint whose last good scrape is older is stale: it leaves the candidates while any
    endpoint is fresh (if none is, every endpoint stays a candidate: never fail closed)."""
    max_request_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0, alias="maxRequestBodyBytes")
    models_interval: Duration = Field(default="2s", alias="modelsInterval")
    emit_endpoint_scores: bool = Field(default=False, alias="emitEndpointScores")
    flow_control: bool | None = Field(default=None, alias="flowControl")
    """Flow control on or off regardless of llm-d's `flowControl` feature gate (None: the gate
    decides)."""

    @field_validator("metrics_staleness_threshold", "models_interval")
    @classmethod
    def _duration(cls, v: Duration) -> Duration:
        parse_duration(v)
        return v


class EndpointPickerConfig(StrictModel):
    api_version: str = Field(default="llm-d.ai/v1alpha1", alias="apiVersion")
    kind: Literal["EndpointPickerConfig"] = "EndpointPickerConfig"
    feature_gates: list[str] = Field(default_factory=list, alias="featureGates")
    plugins: list[PluginSpec] = Field(default_factory=list)
    scheduling_profiles: list[ProfileSpec] = Field(default_factory=list, alias="schedulingProfiles")
    data_layer: DataLayerSpec = Field(default_factory=DataLayerSpec, alias="dataLayer")
    request_handler: RequestHandlerSpec | None = Field(default=None, alias="requestHandler")
    flow_control: dict[str, Any] | None = Field(default=None, alias="flowControl")
    saturation_detector: dict[str, Any] | None = Field(default=None, alias="saturationDetector")
    parser: dict[str, Any] | None = None
    llmd: LlmdOptions = Field(default_factory=LlmdOptions)

    @field_validator("api_version")
    @classmethod
    def _api(cls, v: str) -> str:
        if v not in API_VERSIONS:
            raise ValueError(f"apiVersion must be one of {', '.join(API_VERSIONS)}")
        return v


# --- building ------------------------------------------------------------------------------


@dataclass
class Profile:
    """A named pipeline: filters in order, weighted scorers, one picker."""

    name: str
    filters: list[Filter[Any]]
    scorers: list[tuple[Scorer[Any], float]]
    picker: Picker[Any]


@dataclass(frozen=True)
class SchedulerSettings:
    """llmd's own scheduler settings (the `llmd:` section), resolved to plain values."""

    pick_time_accounting: bool = True
    staleness_s: float = 1.0
    max_body_bytes: int = 16 * 1024 * 1024
    models_interval_s: float = 2.0
    emit_endpoint_scores: bool = False


@dataclass
class BuiltConfig:
    """The plugin instances and profiles a Director runs."""

    source: EndpointPickerConfig
    plugins: dict[str, Plugin[Any]]
    profiles: dict[str, Profile]
    handler: ProfileHandler[Any]
    producers: list[DataProducer[Any]]
    pre_request: list[PreRequest[Any]]
    response_hooks: list[ResponseHook[Any]]
    parsers: list[str]
    settings: SchedulerSettings = field(default_factory=SchedulerSettings)
    datalayer: DataLayerSettings = field(default_factory=DataLayerSettings)
    admitters: list[Admitter[Any]] = field(default_factory=list)
    flow: FlowParts | None = None
    """Flow control's settings and policies, when it is on."""
    saturation_detector: SaturationDetector | None = None
    """The pool's saturation detector (flow control's, or the sheddable-request gate's)."""


def _loc(parts: tuple[Any, ...]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _validation_issues(exc: ValidationError, prefix: str = "") -> list[ConfigIssue]:
    issues = []
    for err in exc.errors():
        path = _loc(tuple(err["loc"]))
        if not prefix and err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
            issues.append(
                ConfigIssue(
                    path,
                    "not an EndpointPickerConfig key (llm-d's loader rejects it too; a profile "
                    "handler is a plugin under plugins)",
                )
            )
            continue
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        issues.append(ConfigIssue(path, err["msg"]))
    return issues


def read_config_text(text: str, origin: str) -> EndpointPickerConfig:
    """Parse and validate a config document (schema only); ConfigError lists every issue."""
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigIssue("", f"over {MAX_CONFIG_BYTES} bytes")], origin)
    data = yaml_mapping(text, "the document", origin)
    try:
        return EndpointPickerConfig.model_validate(data)
    except ValidationError as exc:
        issues = _validation_issues(exc)
        plugins = data.get("plugins")
        for i, entry in enumerate(plugins if isinstance(plugins, list) else []):
            kind = entry.get("type") if isinstance(entry, dict) else None
            if isinstance(kind, str) and (kind in compat.UNAVAILABLE or kind in compat.REMOVED):
                issues.append(ConfigIssue(f"plugins[{i}].type", compat.missing_message(kind)))
        raise ConfigError(issues, origin) from None


def load_config_file(
    path: str | Path | None, text: str | None = None
) -> tuple[EndpointPickerConfig, str]:
    """The config from a file, inline text, or llm-d's default when neither is given."""
    if path is not None and text is not None:
        raise ConfigError([ConfigIssue("", "give either a config file or config text, not both")])
    if path is not None:
        p = Path(path)
        try:
            raw = p.read_text()
        except OSError as exc:
            raise ConfigError([ConfigIssue("", f"cannot read {p}: {exc.strerror}")]) from None
        except UnicodeDecodeError:
            raise ConfigError([ConfigIssue("", f"{p} is not UTF-8 text")]) from None
        return read_config_text(raw, f"scheduler config {p}"), str(p)
    if text is not None:
        return read_config_text(text, "scheduler config text"), "--config-text"
    return read_config_text(DEFAULT_CONFIG, "default scheduler config"), "built-in default"


_PARSERS = ("openai-parser", "passthrough-parser")
_DATALAYER_TYPES = frozenset(
    {
        "metrics-data-source",
        "core-metrics-extractor",
        "models-data-source",
        "models-data-extractor",
        "file-discovery",
        "endpoint-notification-source",
        "k8s-notification-source",
    }
)
_INERT_TYPES = frozenset(_PARSERS) | _DATALAYER_TYPES


def build(
    cfg: EndpointPickerConfig,
    registry: PluginRegistry,
    handle: PluginHandle,
    *,
    allow_experimental: bool = False,
) -> BuiltConfig:
    """Instantiate plugins and profiles, applying llm-d's defaults; ConfigError on any issue."""
    issues: list[ConfigIssue] = []
    plugins: dict[str, Plugin[Any]] = {}
    inert: dict[str, str] = {}
    specs = list(enumerate(cfg.plugins))

    prepared = compat.prepare([(i, s.name, s.type, s.parameters) for i, s in specs])
    issues.extend(prepared.issues)
    missing = prepared.missing
    inert_params: dict[str, tuple[str, dict[str, Any]]] = {}
    seen: set[str] = set()
    for cs in prepared.specs:
        name, where = cs.name, f"plugins[{cs.index}]"
        if name in seen:
            issues.append(ConfigIssue(f"{where}.name", f"duplicate plugin name {name!r}"))
            continue
        seen.add(name)
        if name in missing:
            continue
        if cs.type in _INERT_TYPES:
            inert[name] = cs.type
            inert_params[name] = (where, cs.parameters)
            continue
        cls, canonical = registry.resolve(cs.type)
        if cls is None:
            known = ", ".join(registry.types() + sorted(_INERT_TYPES))
            issues.append(
                ConfigIssue(
                    f"{where}.type",
                    f"unknown plugin type {cs.type!r} (neither llmd nor llm-d has it); "
                    f"known: {known}",
                )
            )
            continue
        if canonical is not None:
            compat.warn(f"plugin type {cs.type!r} is deprecated; use {canonical!r}")
        if cls.experimental and not allow_experimental:
            issues.append(
                ConfigIssue(
                    f"{where}.type",
                    f"{cs.type!r} is experimental (Alpha); start with "
                    "--allow-experimental-plugins to use it",
                )
            )
            continue
        try:
            params = cls.Params.model_validate(cs.parameters)
            plugins[name] = cls(name, params, handle)
        except ValidationError as exc:
            issues.extend(_validation_issues(exc, f"{where}.parameters"))
            continue
        except ValueError as exc:  # a plugin refusing its settings (an unusable tokenizer)
            issues.append(ConfigIssue(f"{where}.parameters", str(exc)))
            continue

    def auto(type_name: str) -> Plugin[Any]:
        """llm-d auto-creates a default producer a consumer needs but the config lacks."""
        if type_name in plugins:
            return plugins[type_name]
        cls, _ = registry.resolve(type_name)
        assert cls is not None
        defaults = prepared.approx_defaults if type_name == "approx-prefix-cache-producer" else {}
        plugin = cls(type_name, cls.Params.model_validate(defaults), handle)
        plugins[type_name] = plugin
        return plugin

    for plugin in list(plugins.values()):
        for needed in getattr(plugin, "needs", ()):
            if not any(p.type_name == needed for p in plugins.values()):
                auto(needed)  # llm-d creates a consumer's default producer
    index_of = {cs.name: cs.index for cs in prepared.specs}
    for name, plugin in list(plugins.items()):
        wanted = getattr(plugin.params, "prefix_match_info_producer_name", None)
        if wanted is not None and wanted not in plugins and wanted not in missing:
            if wanted == "approx-prefix-cache-producer":
                if not any(
                    p.type_name == "precise-prefix-cache-producer" for p in plugins.values()
                ):
                    auto(wanted)
            else:
                issues.append(
                    ConfigIssue(
                        f"plugins[{index_of.get(name, name)}]"
                        ".parameters.prefixMatchInfoProducerName",
                        f"no plugin named {wanted!r}",
                    )
                )

    profile_specs = cfg.scheduling_profiles
    if not profile_specs:
        refs = [
            ProfilePluginRef(pluginRef=n)
            for n, p in plugins.items()
            if isinstance(p, Filter | Scorer | Picker)
        ]
        profile_specs = [ProfileSpec(name="default", plugins=refs)]

    profiles: dict[str, Profile] = {}
    for pi, ps in enumerate(profile_specs):
        where = f"schedulingProfiles[{pi}]"
        if ps.name in profiles:
            issues.append(ConfigIssue(f"{where}.name", f"duplicate profile name {ps.name!r}"))
            continue
        filters: list[Filter[Any]] = []
        scorers: list[tuple[Scorer[Any], float]] = []
        pickers: list[Picker[Any]] = []
        for ri, ref in enumerate(ps.plugins):
            rwhere = f"{where}.plugins[{ri}].pluginRef"
            found = plugins.get(ref.plugin_ref)
            if found is None:
                if ref.plugin_ref in missing:
                    continue  # reported where the plugin is declared
                if ref.plugin_ref in inert:
                    issues.append(
                        ConfigIssue(rwhere, f"{ref.plugin_ref!r} cannot be used in a profile")
                    )
                else:
                    issues.append(ConfigIssue(rwhere, f"no plugin named {ref.plugin_ref!r}"))
                continue
            plugin = found
            matched = False
            if isinstance(plugin, Filter):
                filters.append(plugin)
                matched = True
            if ref.weight is not None and ref.weight < 0:
                issues.append(
                    ConfigIssue(
                        f"{where}.plugins[{ri}].weight", "must be greater than or equal to 0"
                    )
                )
            if isinstance(plugin, Scorer):
                scorers.append((plugin, 1.0 if ref.weight is None else ref.weight))
                matched = True
            if isinstance(plugin, Picker):
                pickers.append(plugin)
                matched = True
            if not matched and isinstance(plugin, DataProducer):
                compat.warn(
                    f"{rwhere}: {ref.plugin_ref!r} ({plugin.type_name}) is a data producer; "
                    "producers run for every request, so listing one in a profile changes nothing"
                )
            elif not matched:
                issues.append(
                    ConfigIssue(
                        rwhere,
                        f"{ref.plugin_ref!r} ({plugin.type_name}) is not a filter, "
                        "scorer or picker",
                    )
                )
        if len(pickers) > 1:
            issues.append(
                ConfigIssue(f"{where}.plugins", f"a profile takes one picker, got {len(pickers)}")
            )
        picker = pickers[0] if pickers else auto("max-score-picker")
        if not isinstance(picker, Picker):  # pragma: no cover - auto() returns the type
            raise TypeError("max-score-picker is not a Picker")
        profiles[ps.name] = Profile(ps.name, filters, scorers, picker)

    handlers = [p for p in plugins.values() if isinstance(p, ProfileHandler)]
    if len(handlers) > 1:
        issues.append(ConfigIssue("plugins", "at most one profile handler may be configured"))
    handler: ProfileHandler[Any] | None = None
    if handlers:
        handler = handlers[0]
    elif len(profiles) <= 1:
        h = auto("single-profile-handler")
        assert isinstance(h, ProfileHandler)
        handler = h
    elif missing:
        pass  # the config's handler is one of the missing plugins, already reported
    else:
        issues.append(
            ConfigIssue(
                "plugins",
                f"{len(profiles)} scheduling profiles need a profile handler plugin",
            )
        )

    bind = getattr(handler, "bind", None)
    if bind is not None and handler is not None:
        for problem in bind(plugins, list(profiles)):
            issues.append(ConfigIssue(f"plugins.{handler.name}", problem))

    parsers = [p.plugin_ref for p in (cfg.request_handler.parsers if cfg.request_handler else [])]
    parser_types = []
    for i, parser in enumerate(parsers):
        t = inert.get(parser, parser if parser in _PARSERS else "")
        if t not in _PARSERS:
            issues.append(
                ConfigIssue(
                    f"requestHandler.parsers[{i}].pluginRef",
                    f"{parser!r} is not a supported parser ({', '.join(_PARSERS)})",
                )
            )
        parser_types.append(t)
    if not parsers:
        parser_types = list(_PARSERS)

    datalayer = datalayer_settings(
        {n: v for n, v in inert_params.items() if inert[n] in _DATALAYER_TYPES}, inert, issues
    )
    precise = any(p.type_name == "precise-prefix-cache-producer" for p in plugins.values())
    for name, plugin in plugins.items():
        vllm = getattr(plugin.params, "backend", "") == "vllm"
        if plugin.type_name == "token-producer" and vllm and not precise:
            compat.warn(
                f"{name}: the vLLM tokenizer backend feeds precise-prefix-cache-producer "
                "only; llmd's approximate producer hashes the request's byte estimate"
            )
    gates = _gates(cfg.feature_gates)
    for gate in gates:
        if gate != "flowControl":
            log.warning("feature gate %r is accepted but has no effect in llmd-scheduler", gate)
    flow_on = (
        cfg.llmd.flow_control
        if cfg.llmd.flow_control is not None
        else gates.get("flowControl", False)
    )
    flow, detector = _flow_parts(cfg, flow_on, plugins, registry, auto, issues, set(missing))

    if issues or handler is None:
        raise ConfigError(issues, "scheduler config")

    ordered = list(plugins.values())
    return BuiltConfig(
        source=cfg,
        plugins=plugins,
        profiles=profiles,
        handler=handler,
        producers=[p for p in ordered if isinstance(p, DataProducer)],
        pre_request=[p for p in ordered if isinstance(p, PreRequest)],
        response_hooks=[p for p in ordered if isinstance(p, ResponseHook)],
        parsers=parser_types,
        settings=SchedulerSettings(
            pick_time_accounting=cfg.llmd.pick_time_accounting,
            staleness_s=parse_duration(cfg.llmd.metrics_staleness_threshold),
            max_body_bytes=cfg.llmd.max_request_body_bytes,
            models_interval_s=parse_duration(cfg.llmd.models_interval),
            emit_endpoint_scores=cfg.llmd.emit_endpoint_scores,
        ),
        datalayer=datalayer,
        admitters=[p for p in ordered if isinstance(p, Admitter)],
        flow=flow,
        saturation_detector=detector,
    )


# --- flow control ------------------------------------------------------------------------------


@dataclass
class FlowParts:
    """Flow control as configured: the spec and the policy instances it names."""

    spec: FlowControlSpec
    detector: SaturationDetector
    usage: UsageLimitPolicy
    fairness: dict[str, FairnessPolicy]
    ordering: dict[str, OrderingPolicy]
    eviction_filter: EvictionFilter | None = None
    eviction_order: EvictionOrder | None = None


def _gates(raw: list[str]) -> dict[str, bool]:
    """llm-d's feature gates: `name`, `name=true`, `name=false`."""
    out: dict[str, bool] = {}
    for g in raw:
        name, _, value = g.partition("=")
        out[name.strip()] = value.strip().lower() not in ("false", "0", "off")
    return out


def _flow_parts(
    cfg: EndpointPickerConfig,
    on: bool,
    plugins: dict[str, Plugin[Any]],
    registry: PluginRegistry,
    auto: Any,
    issues: list[ConfigIssue],
    missing: set[str],
) -> tuple[FlowParts | None, SaturationDetector | None]:
    try:
        spec = FlowControlSpec.model_validate(cfg.flow_control or {})
    except ValidationError as exc:
        issues.extend(_validation_issues(exc, "flowControl"))
        return None, None

    def policy(ref: str | None, kind: type, default: str, where: str) -> Any:
        name = ref or default
        if name in missing:
            return None  # reported where the plugin is declared
        found = plugins.get(name)
        if found is None:
            cls, _ = registry.resolve(name)
            if cls is not None and issubclass(cls, kind):
                found = auto(name)
        if found is None:
            issues.append(ConfigIssue(where, f"no plugin named {name!r}"))
        elif not isinstance(found, kind):
            issues.append(ConfigIssue(where, f"{name!r} is not a {kind.__name__}"))
            found = None
        return found

    legacy = cfg.saturation_detector.get("pluginRef") if cfg.saturation_detector else None
    ref = spec.saturation_detector.plugin_ref if spec.saturation_detector else legacy
    where = (
        "flowControl.saturationDetector.pluginRef"
        if spec.saturation_detector
        else ("saturationDetector.pluginRef")
    )
    detector = policy(ref, SaturationDetector, "utilization-detector", where)
    if cfg.flow_control is not None and not on:
        log.warning(
            "flowControl is set but the flowControl feature gate is off: requests are not "
            "queued; only the saturation detector is used (llm-d's behaviour)"
        )
    if not on:
        return None, detector
    usage = policy(
        spec.usage_limit_policy_plugin_ref,
        UsageLimitPolicy,
        "static-usage-limit-policy",
        "flowControl.usageLimitPolicyPluginRef",
    )
    fairness: dict[str, FairnessPolicy] = {}
    ordering: dict[str, OrderingPolicy] = {}
    bands: list[tuple[str, Any]] = [
        (f"flowControl.priorityBands[{i}]", b) for i, b in enumerate(spec.priority_bands)
    ]
    for key in ("default_priority_band", "default_negative_priority_band"):
        t = getattr(spec, key)
        if t is not None:
            alias = FlowControlSpec.model_fields[key].alias
            bands.append((f"flowControl.{alias}", t))
    wanted_f = {("global-strict-fairness-policy", "flowControl")}
    wanted_o = {("fcfs-ordering-policy", "flowControl")}
    for where, b in bands:
        if b.fairness_policy_ref:
            wanted_f.add((b.fairness_policy_ref, f"{where}.fairnessPolicyRef"))
        if b.ordering_policy_ref:
            wanted_o.add((b.ordering_policy_ref, f"{where}.orderingPolicyRef"))
    for name, where in sorted(wanted_f):
        got = policy(name, FairnessPolicy, name, where)
        if got is not None:
            fairness[name] = got
    for name, where in sorted(wanted_o):
        got = policy(name, OrderingPolicy, name, where)
        if got is not None:
            ordering[name] = got

    def eviction_policy(kind: type, default: str) -> Any:
        """A configured plugin of `kind` under any name, else llm-d's default one."""
        found = next((p for p in plugins.values() if isinstance(p, kind)), None)
        return found or policy(default, kind, default, "flowControl.enableEviction")

    eviction_filter = eviction_order = None
    if spec.enable_eviction:
        eviction_filter = eviction_policy(EvictionFilter, "sheddable-eviction-filter")
        eviction_order = eviction_policy(EvictionOrder, "priority-then-time-eviction-order-policy")
    if detector is None or usage is None:
        return None, detector
    return (
        FlowParts(spec, detector, usage, fairness, ordering, eviction_filter, eviction_order),
        detector,
    )
