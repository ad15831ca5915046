"""P/D disaggregation with llm-d's type names: the profile handler that picks a decode pod and,
when a decider says so, a prefill pod; the deciders; and the header the decode pod's sidecar
reads (`x-prefiller-host-port`).

    plugins:
    - type: prefill-filter
    - type: decode-filter
    - type: disagg-profile-handler
      parameters: {deciders: {prefill: prefix-based-pd-decider}}
    - type: prefix-based-pd-decider
      parameters: {nonCachedTokens: 16}
    schedulingProfiles:
    - {name: prefill, plugins: [{pluginRef: prefill-filter}, ...]}
    - {name: decode, plugins: [{pluginRef: decode-filter}, ...]}

`disagg-profile-handler` (decode first, llm-d's default order): run `decode`; if it picked a pod
and the prefill decider agrees, run `prefill`. The decode pick is the destination; as a
PreRequest it replaces any client-sent `x-prefiller-host-port` with the prefill pick's
`address:port`. Each decision is counted in `llm_d_epp_disagg_decision_total{decision_type}`
(`decode-only`, `prefill-decode`) and shows in `/debug/decisions`. The deprecated
`pd-profile-handler` (llm-d v0.7-v0.9) is the same handler under its old name and parameters.

E/P/D: with an `encode` profile (`encode-filter`: pods whose `llm-d.ai/role` is encode,
encode-prefill or encode-prefill-decode) the handler runs it after `decode` when the encode
decider says so (`deciders.encode`; `always-disagg-multimodal-decider`, the default: any chat
request with image, audio or video parts), before the prefill decision. The encode picks go to
the sidecar as `x-encoder-hosts-ports` (comma-separated); the sidecar sends each multimodal item
to one of them and hands their `ec_transfer_params` on. An encode profile that finds no pod
does not fail the request: the decode (or prefill) pod encodes itself, and the explanation says
so. Decision types add `encode-decode` and `encode-prefill-decode`.

`llmd-cost-pd-decider` (llmd's own) disaggregates only when it pays; see `CostDecider`.
`llmd-cache-source-pd-decider` (llmd's own) moves cached KV instead of recomputing it: when the
decode pick lacks a prefix another pod holds, that pod prefills (mostly from its cache) and the
decode pod pulls the blocks; see `CacheSourceDecider`. A decider that costed a particular
prefill pod names it, and the handler takes that pod when the prefill profile's filters kept it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry
from pydantic import Field

from llmd.protocol import headers as hdr
from llmd.runtime.fastmetrics import Counter
from llmd.runtime.observability import LabelBudget
from llmd.scheduler.framework import (
    LLMRequest,
    NoParams,
    Plugin,
    PluginParams,
    PreRequest,
    ProfileHandler,
    ProfileResult,
    SchedulingError,
    SchedulingResult,
    prefix_matches,
    uncached_tokens,
)
from llmd.scheduler.plugins.dataparallel import rank_header
from llmd.scheduler.plugins.filters import ROLE_LABEL, PrefillFilter

log = logging.getLogger(__name__)

MAX_MODEL_LABELS = 1000


CHOICE_STATE = "pd-prefill-choice"


@dataclass
class PrefillChoice:
    """The prefill pod a decider costed for this request (its endpoint key), if it named one."""

    key: str = ""
    name: str = ""


class PDDecider(Plugin[Any]):
    """Whether a request that has its decode pod should be prefilled elsewhere."""

    def disaggregate(self, request: LLMRequest, decode: ProfileResult) -> tuple[bool, str]:
        """(disaggregate, why)."""
        raise NotImplementedError

    @staticmethod
    def name_prefill_pod(request: LLMRequest, e: Any) -> None:
        """Ask the handler to use pod `e` for the prefill leg (the pod this decision costed)."""
        choice = request.state(CHOICE_STATE, PrefillChoice)
        choice.key, choice.name = e.key, e.endpoint.name


class EncodeDecider(Plugin[Any]):
    """Whether a request that has its decode pod should have its multimodal items encoded on
    encode pods."""

    def encode(self, request: LLMRequest, decode: ProfileResult) -> tuple[bool, str]:
        """(encode remotely, why)."""
        raise NotImplementedError


class AlwaysDisaggMultimodal(EncodeDecider, Plugin[NoParams]):
    """llm-d's multimodal decider: every chat request with image, audio or video parts."""

    type_name = "always-disagg-multimodal-decider"

    def encode(self, request: LLMRequest, decode: ProfileResult) -> tuple[bool, str]:
        n = request.media_items
        return (True, f"{n} multimodal item(s)") if n else (False, "no multimodal items")


@dataclass
class DisaggStages:
    """Which stage decisions this scheduling run has made (the handler is called once per
    stage)."""

    encode: bool = False
    prefill: bool = False


STAGES_STATE = "disagg-stages"


class AlwaysDisagg(PDDecider, Plugin[NoParams]):
    """Every request is prefilled on a prefill pod."""

    type_name = "always-disagg-pd-decider"

    def disaggregate(self, request: LLMRequest, decode: ProfileResult) -> tuple[bool, str]:
        return True, "always"


class PrefixParams(PluginParams):
    non_cached_tokens: int = Field(default=0, ge=0, alias="nonCachedTokens")
    """Disaggregate when at least this many prompt tokens are not cached on the decode pod
    (0: never)."""
    prompt_tokens: int = Field(default=0, ge=0, alias="promptTokens")
    """Only prompts at least this long are considered (0: any)."""
    prefix_plugin_name: str = Field(default="", alias="prefixPluginName")


class PrefixBasedDecider(PDDecider, Plugin[PrefixParams]):
    """llm-d's prefix-based decider: disaggregate when the decode pod would have to compute at
    least `nonCachedTokens` prompt tokens itself (its prefix-cache hit subtracted)."""

    type_name = "prefix-based-pd-decider"
    Params = PrefixParams

    def disaggregate(self, request: LLMRequest, decode: ProfileResult) -> tuple[bool, str]:
        p = self.params
        tokens = request.prompt_tokens
        if p.non_cached_tokens == 0:
            return False, "nonCachedTokens is 0"
        if tokens < p.prompt_tokens or tokens < p.non_cached_tokens:
            return False, f"{tokens} prompt tokens: too short"
        matches = prefix_matches(request, p.prefix_plugin_name or "approx-prefix-cache-producer")
        pick = decode.targets[0]
        target = pick.endpoint.name
        if matches is None:
            return False, "no prefix information (no prefix-cache producer ran)"
        uncached = uncached_tokens(request, matches, pick.key)
        decided = uncached >= p.non_cached_tokens
        return decided, f"{uncached} of {tokens} prompt tokens not cached on {target}"


class CostParams(PluginParams):
    min_uncached_tokens: int = Field(default=256, ge=1, alias="minUncachedTokens")
    """Fewer prompt tokens to compute on the decode pod than this: always local."""
    min_running_decodes: int = Field(default=1, ge=0, alias="minRunningDecodes")
    """The decode pod must be decoding at least this many requests: a prefill on an idle pod
    delays no one, and P/D would only add the transfer to this request's TTFT."""
    max_ttft_increase: float = Field(default=0.2, ge=0, le=10, alias="maxTTFTIncrease")
    """Disaggregate when the predicted remote TTFT is at most (1 + this) x the local one."""
    prefill_seconds_per_token: float = Field(
        default=1e-4, gt=0, le=1, alias="prefillSecondsPerToken"
    )
    """Prefill cost where an engine has not shown its own yet (its prefill seconds over
    computed prompt tokens, from the scraped counters, once 1,000 tokens are in). A prefill pod
    without its own takes the decode pod's."""
    transfer_seconds_per_token: float = Field(
        default=5e-6, ge=0, le=1, alias="transferSecondsPerToken"
    )
    """Moving one token's KV from the prefill pod to the decode pod (131 kB per token over a
    25 GB/s link: 5 us)."""
    prefix_plugin_name: str = Field(default="", alias="prefixPluginName")


MIN_MEASURED_TOKENS = 1000


def prefill_cost(e: Any, fallback: float | None, default: float) -> float:
    """Endpoint `e`'s measured prefill seconds per token (its scraped counters, once it has
    computed MIN_MEASURED_TOKENS); else `fallback` (the decode pod's, so that a pod never used
    for prefill yet is not judged by a static guess against a measured rival), else `default`."""
    c = e.counters
    if (
        c is not None
        and c.computed_tokens
        and c.computed_tokens >= MIN_MEASURED_TOKENS
        and c.prefill_seconds is not None
    ):
        return float(c.prefill_seconds / c.computed_tokens)
    return fallback if fallback is not None else default


class CostDecider(PDDecider, Plugin[CostParams]):
    """llmd's decider: prefill elsewhere only when the decode pod has decodes to protect and
    the predicted TTFT of the remote prefill stays within `maxTTFTIncrease` of a local one.

    With u_D prompt tokens not cached on the decode pod D and c the seconds per prefilled token
    (each engine's own, measured), for the prefill pod P with the lowest prediction:

        local  = waiting(D) x u_D x c_D + u_D x c_D
        remote = backlog(P) x c_P + u_P x c_P + u_D x transfer

    Waiting requests on D are taken to be like this one. P's backlog is what its last scrape
    showed (waiting + running prefill legs, each the size of the average prefill this decider
    sent) plus the prompt tokens sent to it since that scrape (the handler notes each prefill
    leg on P as an unseen pick), plus any decode work accounted on it. The prefill leg never
    returns through the gateway, so in-flight accounting alone would leave P's queue empty and
    every request would pile onto one prefill pod. The numbers show in /debug/explain.
    """

    type_name = "llmd-cost-pd-decider"
    Params = CostParams

    def __init__(self, name: str, params: CostParams, handle: Any) -> None:
        super().__init__(name, params, handle)
        self.mean_prefill_tokens = 0.0
        """Moving average of the prompt tokens of the prefill legs this decider chose."""

    def backlog_tokens(self, e: Any) -> float:
        m = e.metrics
        scraped = ((m.waiting or 0) + (m.running or 0)) if m is not None else 0
        return float(e.inflight_tokens + e.unseen_tokens + scraped * self.mean_prefill_tokens)

    def _cost(self, e: Any, fallback: float | None = None) -> float:
        return prefill_cost(e, fallback, self.params.prefill_seconds_per_token)

    def disaggregate(self, request: LLMRequest, decode: ProfileResult) -> tuple[bool, str]:
        p = self.params
        tokens = request.prompt_tokens
        pick = decode.targets[0]
        matches = prefix_matches(request, p.prefix_plugin_name or "approx-prefix-cache-producer")

        u_d = uncached_tokens(request, matches, pick.key)
        if u_d < p.min_uncached_tokens:
            return (
                False,
                f"{u_d} of {tokens} prompt tokens to compute: under {p.min_uncached_tokens}",
            )
        m = pick.metrics
        running = m.running if m is not None and m.running is not None else pick.inflight_requests
        if running < p.min_running_decodes:
            return (
                False,
                f"{pick.endpoint.name} runs {running} decodes: a local prefill delays none",
            )
        c_d = self._cost(pick)
        waiting = (m.waiting or 0) if m is not None else 0
        local = (waiting + 1) * u_d * c_d
        best: tuple[float, Any, float, float, int] | None = None
        for e in self.handle.endpoints():
            if e.endpoint.labels.get(ROLE_LABEL) not in PrefillFilter.roles or e.key == pick.key:
                continue
            c_p = self._cost(e, c_d)
            queue = self.backlog_tokens(e) * c_p
            u_p = uncached_tokens(request, matches, e.key)
            compute = u_p * c_p
            remote = queue + compute + u_d * p.transfer_seconds_per_token
            if best is None or remote < best[0]:
                best = (remote, e, queue, compute, u_p)
        if best is None:
            return False, "no prefill pod"
        remote, chosen, queue, compute, u_p = best
        name = chosen.endpoint.name
        limit = (1 + p.max_ttft_increase) * local
        yes = remote <= limit
        if yes:
            n = self.mean_prefill_tokens
            self.mean_prefill_tokens = u_p if n == 0 else 0.9 * n + 0.1 * u_p
            self.name_prefill_pod(request, chosen)
        return yes, (
            f"{u_d} of {tokens} prompt tokens to compute on {pick.endpoint.name}, which runs "
            f"{running} decodes and has {waiting} waiting: local ~{local * 1000:.1f} ms; remote "
            f"~{remote * 1000:.1f} ms on {name} (queue {queue * 1000:.1f} + prefill "
            f"{compute * 1000:.1f} + transfer {u_d * p.transfer_seconds_per_token * 1000:.1f}); "
            f"{'within' if yes else 'over'} {1 + p.max_ttft_increase:g}x local"
        )


class CacheSourceParams(PluginParams):
    min_cached_token_delta: int = Field(default=256, ge=1, alias="minCachedTokenDelta")
    """The source must hold at least this many more of the prompt's tokens than the decode
    pod (llm-d's p2p-source-producer has the same parameter, default 1 block)."""
    max_ttft_increase: float = Field(default=0.0, ge=0, le=10, alias="maxTTFTIncrease")
    """Pull when the predicted TTFT is at most (1 + this) x recomputing on the decode pod."""
    prefill_seconds_per_token: float = Field(
        default=1e-4, gt=0, le=1, alias="prefillSecondsPerToken"
    )
    """Prefill cost where an engine has not shown its own yet (as `llmd-cost-pd-decider`)."""
    transfer_seconds_per_token: float = Field(
        default=5e-6, ge=0, le=1, alias="transferSecondsPerToken"
    )
    """Moving one token's KV between pods."""
    prefix_plugin_name: str = Field(default="", alias="prefixPluginName")


class CacheSourceDecider(PDDecider, Plugin[CacheSourceParams]):
    """llmd's cache-source routing: when the decode pick lacks a prefix that another pod
    holds, the holder prefills (only the part it has not cached) and the decode pod pulls the
    blocks, instead of computing the prefix again.

    This is what happens to a hot prefix whose holder is busy: the load scorers send the
    request elsewhere, and an aggregated pool recomputes the prefix there. With u_X the prompt
    tokens pod X would compute, c_X its seconds per prefilled token and t the transfer seconds
    per token, for the source S holding the most of the prompt:

        local  = u_D x c_D
        remote = queue(S) + u_S x c_S + u_D x t,   queue(S) = (waiting(S) x u_D + sent) x c_S

    A prefill leg on S waits behind S's waiting requests (each taken to be as big as this
    one's work on D) and the legs sent to S since its last scrape; S's running decodes do not
    hold it back (vLLM batches the leg with them). The pods must run vLLM's NixlConnector as
    `kv_both` with llmd-sidecar in front (role label `both`), so that any of them can prefill
    for another. The numbers show in /debug/explain."""

    type_name = "llmd-cache-source-pd-decider"
    Params = CacheSourceParams

    def disaggregate(self, request: LLMRequest, decode: ProfileResult) -> tuple[bool, str]:
        p = self.params
        tokens = request.prompt_tokens
        pick = decode.targets[0]
        matches = prefix_matches(request, p.prefix_plugin_name or "approx-prefix-cache-producer")
        if matches is None:
            return False, "no prefix information (no prefix-cache producer ran)"
        u_d = uncached_tokens(request, matches, pick.key)
        best: tuple[int, Any] | None = None
        for e in self.handle.endpoints():
            if e.endpoint.labels.get(ROLE_LABEL) not in PrefillFilter.roles or e.key == pick.key:
                continue
            u_s = uncached_tokens(request, matches, e.key)
            if best is None or u_s < best[0]:
                best = (u_s, e)
        if best is None:
            return False, "no other pod can prefill"
        u_s, source = best
        name = source.endpoint.name
        if u_d - u_s < p.min_cached_token_delta:
            return False, (
                f"{pick.endpoint.name} lacks {u_d} of {tokens} prompt tokens; the best source "
                f"{name} holds {u_d - u_s} more: under {p.min_cached_token_delta}"
            )
        c_d = prefill_cost(pick, None, p.prefill_seconds_per_token)
        c_s = prefill_cost(source, c_d, p.prefill_seconds_per_token)
        m = source.metrics
        waiting = (m.waiting or 0) if m is not None else 0
        queue = (waiting * u_d + source.unseen_tokens) * c_s
        compute = u_s * c_s
        transfer = u_d * p.transfer_seconds_per_token
        local = u_d * c_d
        remote = queue + compute + transfer
        yes = remote <= (1 + p.max_ttft_increase) * local
        if yes:
            self.name_prefill_pod(request, source)
        return yes, (
            f"{pick.endpoint.name} lacks {u_d} of {tokens} prompt tokens, {name} lacks {u_s}: "
            f"recompute ~{local * 1000:.1f} ms; pull ~{remote * 1000:.1f} ms (queue "
            f"{queue * 1000:.1f} with {waiting} waiting + prefill {compute * 1000:.1f} + "
            f"transfer {transfer * 1000:.1f}); {'pull' if yes else 'recompute'}"
        )


class Deciders(PluginParams):
    prefill: str = ""
    encode: str = ""


class Profiles(PluginParams):
    decode: str = "decode"
    prefill: str = "prefill"
    encode: str = "encode"


class DisaggParams(PluginParams):
    profiles: Profiles = Field(default_factory=Profiles)
    deciders: Deciders = Field(default_factory=Deciders)
    stage_order: Literal["decode-first"] = Field(default="decode-first", alias="stageOrder")
    # pd-profile-handler's (deprecated) parameter names
    decode_profile: str = Field(default="", alias="decodeProfile")
    prefill_profile: str = Field(default="", alias="prefillProfile")
    decider_plugin_name: str = Field(default="", alias="deciderPluginName")
    primary_port: int = Field(default=0, ge=0, lt=65536, alias="primaryPort")
    prefix_plugin_type: str = Field(default="", alias="prefixPluginType")
    prefix_plugin_name: str = Field(default="", alias="prefixPluginName")


class DisaggProfileHandler(ProfileHandler[DisaggParams], PreRequest[DisaggParams]):
    """Decode first, then prefill when the decider says it pays; sets x-prefiller-host-port."""

    type_name = "disagg-profile-handler"
    Params = DisaggParams

    def __init__(self, name: str, params: DisaggParams, handle: Any) -> None:
        super().__init__(name, params, handle)
        self.decode = params.decode_profile or params.profiles.decode
        self.prefill = params.prefill_profile or params.profiles.prefill
        self.decider_name = params.decider_plugin_name or params.deciders.prefill
        self.decider: PDDecider = AlwaysDisagg("always", NoParams(), handle)
        self.encode = params.profiles.encode
        self.encode_decider: EncodeDecider = AlwaysDisaggMultimodal(
            "multimodal", NoParams(), handle
        )
        self.with_encode = False
        self.with_prefill = True
        self.decisions: list[Counter] = []
        # model names come from clients: a bounded label set, as llm-d caps them
        self.model_label = LabelBudget("disagg_model_name", max_sets=MAX_MODEL_LABELS)
        unused = [
            alias
            for alias, value in (
                ("prefixPluginType", params.prefix_plugin_type),
                ("prefixPluginName", params.prefix_plugin_name),
            )
            if value
        ]
        if unused:
            log.warning(
                "%s: %s not used by llmd (give the prefix plugin to prefix-based-pd-decider's "
                "prefixPluginName)",
                name, ", ".join(unused),
            )  # fmt: skip

    def bind(self, plugins: Mapping[str, Plugin[Any]], profiles: Sequence[str]) -> list[str]:
        """Resolve the decider and check the profiles; problems as messages."""
        problems = []
        self.with_encode = self.encode in profiles
        # E/PD (encode and decode pods only) needs no prefill profile; P/D does
        self.with_prefill = self.prefill in profiles or not self.with_encode
        needed = [("decode", self.decode)]
        if self.with_prefill:
            needed.append(("prefill", self.prefill))
        if self.params.deciders.encode:
            needed.append(("encode", self.encode))
        for role, profile in needed:
            if profile not in profiles:
                problems.append(f"no scheduling profile named {profile!r} (the {role} profile)")
        if self.decider_name:
            found = plugins.get(self.decider_name)
            if not isinstance(found, PDDecider):
                problems.append(f"deciders.prefill: {self.decider_name!r} is not a P/D decider")
            else:
                self.decider = found
        if self.params.deciders.encode:
            named = plugins.get(self.params.deciders.encode)
            if not isinstance(named, EncodeDecider):
                problems.append(
                    f"deciders.encode: {self.params.deciders.encode!r} is not an encode decider "
                    "(always-disagg-multimodal-decider)"
                )
            else:
                self.encode_decider = named
        return problems

    def register_metrics(self, registry: CollectorRegistry) -> None:
        labels = ["plugin_name", "plugin_type", "model_name", "decision_type"]
        self.decisions = [
            Counter(
                name,
                "Disaggregation decisions by type (decode-only, prefill-decode, encode-decode, "
                "encode-prefill-decode)",
                labels,
                registry=registry,
            )
            for name in ("llm_d_epp_disagg_decision_total", "llm_d_epp_pd_decision_total")
        ]  # the second is llm-d's deprecated name, emitted too

    def pick_profiles(
        self, request: LLMRequest, profiles: Sequence[str], results: dict[str, ProfileResult | None]
    ) -> list[str]:
        stages = request.state(STAGES_STATE, DisaggStages)
        if not results:
            stages.encode = stages.prefill = False
            return [self.decode]
        decode = results.get(self.decode)
        if decode is None or not decode.targets:
            return []
        if self.with_encode and not stages.encode:
            stages.encode = True
            yes, why = self.encode_decider.encode(request, decode)
            decode.explain["encode"] = {"reason": why}
            if yes:
                return [self.encode]
        if self.with_prefill and not stages.prefill:
            stages.prefill = True
            yes, why = self.decider.disaggregate(request, decode)
            decode.explain["pd"] = {"reason": why}
            return [self.prefill] if yes else []
        return []

    def process_results(
        self, request: LLMRequest, results: dict[str, ProfileResult | None]
    ) -> SchedulingResult:
        decode = results.get(self.decode)
        if decode is None or not decode.targets:
            raise SchedulingError(
                503, "failed to find available decode workers", hdr.DROPPED_NO_ENDPOINTS
            )
        prefill = results.get(self.prefill) if self.with_prefill else None
        picked = {self.decode: decode}
        kind = "decode-only"
        if prefill is not None and prefill.targets:
            self._take_named_pod(request, prefill)
            picked[self.prefill] = prefill
            kind = "prefill-decode"
        if self.with_encode and self.encode in results:
            encode = results[self.encode]
            if encode is not None and encode.targets:
                picked[self.encode] = encode
                kind = "encode-decode" if kind == "decode-only" else "encode-prefill-decode"
            else:
                where = "prefill" if kind == "prefill-decode" else "decode"
                decode.explain["encode"]["outcome"] = (
                    f"no encode pod passed the encode profile: the {where} pod encodes itself"
                )
        decode.explain.setdefault("pd", {"reason": "no decision"})["decision"] = kind
        (model,) = self.model_label(request.target_model or request.model)
        for counter in self.decisions:
            counter.labels(self.name, self.type_name, model, kind).inc()
        # primaryPort: the decode pick is a data-parallel rank reached through its pod's
        # sidecar on that port (x-data-parallel-host-port names the rank)
        return SchedulingResult(picked, self.decode, port=self.params.primary_port)

    @staticmethod
    def _take_named_pod(request: LLMRequest, prefill: ProfileResult) -> None:
        """Put the pod the decider costed first, when the prefill profile's filters kept it;
        else the profile's own pick stands (and the explanation says so)."""
        choice = request.state(CHOICE_STATE, PrefillChoice)
        if not choice.key:
            return
        if prefill.targets[0].key != choice.key:
            kept = next((c.endpoint for c in prefill.scored if c.endpoint.key == choice.key), None)
            if kept is None:
                prefill.explain["pd"] = {
                    "source": f"the decider costed {choice.name}, which the profile's filters "
                    "removed"
                }
                return
            prefill.targets = [kept, *(t for t in prefill.targets if t.key != choice.key)]
        prefill.explain["pd"] = {"source": f"{choice.name}, as the decider costed"}

    def pre_request(self, request: LLMRequest, result: SchedulingResult) -> Mapping[str, str]:
        headers = dict(rank_header(result))
        encode = result.profiles.get(self.encode) if self.with_encode else None
        if encode is not None and encode.targets:
            headers[hdr.ENCODER_HOSTS_PORTS] = ",".join(_host_port(t) for t in encode.targets)
        prefill = result.profiles.get(self.prefill)
        if prefill is None or not prefill.targets:
            return headers
        target = prefill.targets[0]
        # The prefill leg goes from the decode pod's sidecar, not through the gateway: note it
        # on the prefill pod as a pick its next scrape will show (load scorers and the cost
        # decider read it), so that back-to-back decisions see the queue they build.
        tokens = uncached_tokens(request, prefix_matches(request), target.key)
        target.note_pick(tokens, self.handle.clock())
        return {**headers, hdr.PREFILLER_HOST_PORT: _host_port(target)}


def _host_port(target: Any) -> str:
    """`address:port` of an endpoint, an IPv6 address in brackets."""
    ep = target.endpoint
    host = f"[{ep.address}]" if ":" in ep.address else ep.address
    return f"{host}:{ep.port}"


class PDProfileHandler(DisaggProfileHandler):
    """llm-d's deprecated name for disagg-profile-handler (v0.7-v0.9 parameters)."""

    type_name = "pd-profile-handler"


class PrefillHeaderHandler(Plugin[NoParams]):
    """llm-d's deprecated header handler: the profile handler sets the header itself now, so
    this plugin does nothing (kept so that older configs load)."""

    type_name = "prefill-header-handler"


class DisaggHeadersHandler(PrefillHeaderHandler):
    type_name = "disagg-headers-handler"


DISAGG_PLUGINS = (
    AlwaysDisagg,
    AlwaysDisaggMultimodal,
    PrefixBasedDecider,
    CostDecider,
    CacheSourceDecider,
    DisaggProfileHandler,
    PDProfileHandler,
    PrefillHeaderHandler,
    DisaggHeadersHandler,
)
