"""Predicted-latency routing in process: llm-d's `predicted-latency-producer`, `latency-scorer`
and `latency-slo-admitter`, without a predictor service to deploy.

**The model.** Two online linear regressions (recursive least squares with a forgetting
factor, so the model follows a fleet whose behaviour drifts) predict, for a request on a
candidate endpoint, its time to first token and its time per output token from what the
scheduler already knows at decision time:

    TTFT ~ 1, uncached prompt tokens, prefill tokens in flight there, waiting, running
    TPOT ~ 1, running, waiting, requests in flight there, KV usage

Uncached tokens are the prompt minus the best prefix match any producer reported for that
endpoint. Every streamed response that completes naturally is a training sample: its
features at decision time, its TTFT and TPOT as the gateway measured them. The output token
count behind TPOT is the usage chunk's, or, for a stream without one (the client did not set
`stream_options.include_usage`), the lean path's count of the stream's data events; with
neither, the stream is a TTFT sample only. Until
`minSamples` samples have arrived the model says nothing and the scorer uses llm-d's
composite score (KV, queue, prefix).

**Accuracy** is exported per endpoint (`llmd_latency_prediction_abs_error_seconds{endpoint,
target}`, an exponentially weighted mean absolute error) and per request
(`llm_d_epp_request_predicted_ttft_seconds`, `..._tpot_seconds`). The prefill throughput the
model implies (`llmd_latency_model_prefill_tokens_per_second`) is what the autoscaler can read.

**SLOs** come from `x-llm-d-slo-ttft-ms` / `x-llm-d-slo-tpot-ms` (or the older `x-slo-ttft-ms` /
`x-slo-tpot-ms`). Headroom = SLO x `sloBufferFactor` - prediction. A malformed SLO header is
ignored (as llm-d does), counted in `llmd_invalid_slo_headers_total` and logged once.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from prometheus_client import CollectorRegistry
from pydantic import Field

from llmd.protocol import headers as hdr
from llmd.runtime.config import parse_duration
from llmd.runtime.fastmetrics import Counter, Gauge, Histogram
from llmd.scheduler.framework import (
    Admitter,
    DataProducer,
    EndpointState,
    Filter,
    LLMRequest,
    PluginParams,
    ResponseHook,
    Scorer,
)

log = logging.getLogger(__name__)

PRODUCER = "predicted-latency-producer"
SLO_TTFT = (hdr.SLO_TTFT_MS, hdr.SLO_TTFT_MS_LEGACY)
SLO_TPOT = (hdr.SLO_TPOT_MS, hdr.SLO_TPOT_MS_LEGACY)
MAX_ENDPOINT_LABELS = 4096


class RLS:
    """Recursive least squares: y ~ w . x, updated one sample at a time (O(d^2))."""

    def __init__(self, dims: int, forgetting: float = 0.999, prior: float = 1000.0) -> None:
        self.d = dims
        self.lam = forgetting
        self.w = [0.0] * dims
        self.p = [[prior if i == j else 0.0 for j in range(dims)] for i in range(dims)]
        self.n = 0

    def predict(self, x: list[float]) -> float:
        return sum(wi * xi for wi, xi in zip(self.w, x, strict=True))

    def update(self, x: list[float], y: float) -> None:
        d, p, lam = self.d, self.p, self.lam
        px = [sum(p[i][j] * x[j] for j in range(d)) for i in range(d)]
        denom = lam + sum(x[i] * px[i] for i in range(d))
        if denom <= 1e-12 or not math.isfinite(denom):
            return
        k = [v / denom for v in px]
        err = y - self.predict(x)
        self.w = [self.w[i] + k[i] * err for i in range(d)]
        xp = [sum(x[i] * p[i][j] for i in range(d)) for j in range(d)]
        self.p = [[(p[i][j] - k[i] * xp[j]) / lam for j in range(d)] for i in range(d)]
        self.n += 1


def ttft_features(uncached: float, e: EndpointState) -> list[float]:
    return [1.0, uncached / 1000, e.inflight_tokens / 1000, float(e.waiting), float(e.running)]


def tpot_features(e: EndpointState) -> list[float]:
    return [1.0, float(e.running), float(e.waiting), float(e.inflight_requests), e.kv_usage]


@dataclass(slots=True)
class Prediction:
    ttft_s: float
    tpot_s: float
    ttft_headroom_s: float | None = None
    tpot_headroom_s: float | None = None


@dataclass(slots=True)
class LatencyState:
    """Per request: the SLOs, each candidate's prediction and features (for training)."""

    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    predictions: dict[str, Prediction] = field(default_factory=dict)
    features: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    valid: bool = False
    """The TTFT model has trained: predictions exist."""
    tpot_known: bool = False
    """The TPOT model has trained too (it needs streams that report their usage)."""


class PredictedLatencyParams(PluginParams):
    streaming_mode: bool = Field(default=True, alias="streamingMode")
    """llm-d's switch; llmd learns TTFT and TPOT from streamed responses either way."""
    endpoint_role_label: str | None = Field(default=None, alias="endpointRoleLabel")
    predict_in_produce: bool = Field(default=True, alias="predictInProduce")
    context_ttl: str = Field(default="5m", alias="contextTTL")
    slo_buffer_factor: float = Field(default=1.0, gt=0, alias="sloBufferFactor")
    sampling_mean: float | None = Field(default=None, alias="samplingMean")
    """Deprecated in llm-d and ignored."""
    max_decode_token_samples_for_prediction: int | None = Field(
        default=None, alias="maxDecodeTokenSamplesForPrediction"
    )
    """Deprecated in llm-d and ignored."""
    min_samples: int = Field(default=20, ge=1, alias="minSamples")
    forgetting: float = Field(default=0.999, gt=0.9, le=1.0)


class PredictedLatencyProducer(DataProducer[PredictedLatencyParams], ResponseHook[Any]):
    """Predicts each candidate's TTFT and TPOT for the request (see the module docstring)."""

    type_name = PRODUCER
    Params = PredictedLatencyParams

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        p = self.params
        parse_duration(p.context_ttl)
        self.ttft = RLS(5, p.forgetting)
        self.tpot = RLS(5, p.forgetting)
        self._err: dict[tuple[str, str], float] = {}
        self._invalid_warned = False
        self._m: dict[str, Any] = {}

    # --- metrics ---------------------------------------------------------------------------

    def register_metrics(self, registry: CollectorRegistry) -> None:
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self._m = {
            "pred_ttft": Histogram(
                "llm_d_epp_request_predicted_ttft_seconds",
                "Predicted TTFT of the chosen endpoint",
                buckets=buckets,
                registry=registry,
            ),
            "pred_tpot": Histogram(
                "llm_d_epp_request_predicted_tpot_seconds",
                "Predicted TPOT of the chosen endpoint",
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64),
                registry=registry,
            ),
            "violations": Counter(
                "llm_d_epp_request_slo_violation",
                "Completed requests that missed their SLO, by type (ttft, tpot)",
                ["type"],
                registry=registry,
            ),
            "error": Gauge(
                "llmd_latency_prediction_abs_error_seconds",
                "Mean absolute prediction error per endpoint (exponentially weighted)",
                ["endpoint", "target"],
                registry=registry,
            ),
            "samples": Gauge(
                "llmd_latency_model_samples",
                "Training samples the latency model has seen",
                ["target"],
                registry=registry,
            ),
            "throughput": Gauge(
                "llmd_latency_model_prefill_tokens_per_second",
                "Prefill throughput the TTFT model implies (1 / seconds per uncached token)",
                registry=registry,
            ),
            "invalid": Counter(
                "llmd_invalid_slo_headers",
                "SLO headers that were not a positive number of milliseconds (ignored)",
                registry=registry,
            ),
        }
        self._m["samples"].labels("ttft").set_function(lambda: self.ttft.n)
        self._m["samples"].labels("tpot").set_function(lambda: self.tpot.n)
        self._m["throughput"].set_function(self.prefill_tokens_per_second)

    def prefill_tokens_per_second(self) -> float:
        per_k = self.ttft.w[1] if self.ttft.n >= self.params.min_samples else 0.0
        return 1000 / per_k if per_k > 0 else 0.0

    # --- prediction --------------------------------------------------------------------------

    def _slo(self, request: LLMRequest, names: tuple[str, ...]) -> float | None:
        raw = request.header(*names)
        ms = hdr.slo_ms(raw)
        if ms is None and raw is not None:
            if "invalid" in self._m:
                self._m["invalid"].inc()
            if not self._invalid_warned:
                self._invalid_warned = True
                log.warning("ignoring SLO header value %r (not a positive number of ms)", raw)
        return None if ms is None else ms / 1000 * self.params.slo_buffer_factor

    def produce(self, request: LLMRequest, endpoints: list[EndpointState]) -> None:
        st = request.state(self.name, LatencyState)
        st.slo_ttft_s = self._slo(request, SLO_TTFT)
        st.slo_tpot_s = self._slo(request, SLO_TPOT)
        hits = self._prefix_hits(request)
        ready = self.ttft.n >= self.params.min_samples
        tpot_ready = self.tpot.n >= self.params.min_samples
        st.valid = ready
        st.tpot_known = tpot_ready
        role_label = self.params.endpoint_role_label
        for e in endpoints:
            uncached = max(0, request.prompt_tokens - hits.get(e.key, 0))
            fx, gx = ttft_features(uncached, e), tpot_features(e)
            st.features[e.key] = (fx, gx)
            if not ready:
                continue
            ttft = max(0.0, self.ttft.predict(fx))
            # until the TPOT model has trained, routing is on TTFT alone (TPOT unknown: 0)
            tpot = max(0.0, self.tpot.predict(gx)) if tpot_ready else 0.0
            if role_label and e.endpoint.labels.get(role_label) == "prefill":
                tpot = 0.0  # a prefill pod produces no decode tokens
            pred = Prediction(ttft, tpot)
            if st.slo_ttft_s is not None:
                pred.ttft_headroom_s = st.slo_ttft_s - ttft
            if st.slo_tpot_s is not None and tpot_ready:
                pred.tpot_headroom_s = st.slo_tpot_s - tpot
            st.predictions[e.key] = pred

    @staticmethod
    def _prefix_hits(request: LLMRequest) -> dict[str, int]:
        """Prompt tokens each endpoint holds, by the best prefix match any producer made."""
        out: dict[str, int] = {}
        for matches in request.prefix.values():
            for key, m in matches.items():
                if m.tokens > out.get(key, 0):
                    out[key] = m.tokens
        return out

    # --- training ----------------------------------------------------------------------------

    def response_complete(
        self, request: LLMRequest, endpoint: EndpointState | None, cause: str
    ) -> None:
        timing = request.timing
        if endpoint is None or cause != "natural" or timing is None or not request.stream:
            return
        st = request.state(self.name, LatencyState)
        feats = st.features.get(endpoint.key)
        if feats is None:
            return
        ttft, e2e, out = timing
        pred = st.predictions.get(endpoint.key)
        self.ttft.update(feats[0], ttft)
        if out > 1:
            tpot = max(0.0, e2e - ttft) / (out - 1)
            self.tpot.update(feats[1], tpot)
            if pred is not None:
                self._track(endpoint.key, "tpot", abs(pred.tpot_s - tpot))
            if st.slo_tpot_s is not None and tpot > st.slo_tpot_s and self._m:
                self._m["violations"].labels("tpot").inc()
        if pred is not None:
            self._track(endpoint.key, "ttft", abs(pred.ttft_s - ttft))
            if self._m:
                self._m["pred_ttft"].observe(pred.ttft_s)
                self._m["pred_tpot"].observe(pred.tpot_s)
        if st.slo_ttft_s is not None and ttft > st.slo_ttft_s and self._m:
            self._m["violations"].labels("ttft").inc()

    def _track(self, endpoint: str, target: str, err: float) -> None:
        key = (endpoint, target)
        old = self._err.get(key)
        if old is None and len(self._err) >= 2 * MAX_ENDPOINT_LABELS:
            return
        value = err if old is None else 0.9 * old + 0.1 * err
        self._err[key] = value
        if self._m:
            self._m["error"].labels(endpoint, target).set(value)

    def endpoints_changed(self, live: set[str]) -> None:
        for key in [k for k in self._err if k[0] not in live]:
            del self._err[key]
            if self._m:
                self._m["error"].remove(*key)

    def state(self) -> dict[str, Any]:
        return {
            "samples": {"ttft": self.ttft.n, "tpot": self.tpot.n},
            "ready": self.ttft.n >= self.params.min_samples,
            "tpot_ready": self.tpot.n >= self.params.min_samples,
            "ttft_weights": [round(w, 6) for w in self.ttft.w],
            "tpot_weights": [round(w, 6) for w in self.tpot.w],
            "prefill_tokens_per_second": round(self.prefill_tokens_per_second(), 1),
            "abs_error_s": {f"{k[0]}/{k[1]}": round(v, 4) for k, v in self._err.items()},
        }


def latency_state(request: LLMRequest) -> LatencyState | None:
    for owner, value in request.state_items():
        if isinstance(value, LatencyState) and owner:
            return value
    return None


class LatencyScorerParams(PluginParams):
    ttft_weight: float = Field(default=0.8, ge=0, alias="ttftWeight")
    tpot_weight: float = Field(default=0.2, ge=0, alias="tpotWeight")
    headroom_selection_strategy: Literal["least", "most"] = Field(
        default="least", alias="headroomSelectionStrategy"
    )
    composite_kv_weight: float = Field(default=1.0, ge=0, alias="compositeKVWeight")
    composite_queue_weight: float = Field(default=1.0, ge=0, alias="compositeQueueWeight")
    composite_prefix_weight: float = Field(default=1.0, ge=0, alias="compositePrefixWeight")


class LatencyScorer(Scorer[LatencyScorerParams]):
    """Routes on predicted latency. With SLOs: endpoints that meet them first, the tightest fit
    (`least` headroom) preferred so looser endpoints stay free for harder requests; if none
    meets them, the smallest deficit. Without SLOs: the lowest predicted latency. Without
    predictions yet: llm-d's composite of KV, queue and prefix."""

    type_name = "latency-scorer"
    Params = LatencyScorerParams
    needs: ClassVar[tuple[str, ...]] = (PRODUCER,)

    def score(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[float]:
        st = latency_state(request)
        if st is None or not st.valid or not st.predictions:
            return self._composite(request, endpoints)
        p = self.params
        preds = [st.predictions.get(e.key) for e in endpoints]
        if any(x is None for x in preds):
            return self._composite(request, endpoints)
        ps: list[Prediction] = [x for x in preds if x is not None]
        wt, wp = p.ttft_weight, p.tpot_weight if st.tpot_known else 0.0
        if wt + wp <= 0:  # only TPOT weighed, and TPOT not learned yet
            return self._composite(request, endpoints)
        total = wt + wp
        wt, wp = wt / total, wp / total
        if st.slo_ttft_s is None and st.slo_tpot_s is None:
            c = self._combined([x.ttft_s for x in ps], [x.tpot_s for x in ps], wt, wp)
            return [1.0 - v for v in c]  # lower predicted latency is better
        ttft_h = [x.ttft_headroom_s if x.ttft_headroom_s is not None else 0.0 for x in ps]
        tpot_h = [x.tpot_headroom_s if x.tpot_headroom_s is not None else 0.0 for x in ps]
        meets = [a >= 0 and b >= 0 for a, b in zip(ttft_h, tpot_h, strict=True)]
        if any(meets):
            c = self._combined([abs(h) for h in ttft_h], [abs(h) for h in tpot_h], wt, wp)
            out = []
            for ok, v in zip(meets, c, strict=True):
                if not ok:
                    out.append(0.0)
                elif p.headroom_selection_strategy == "least":
                    out.append(0.5 + 0.5 * (1.0 - v))
                else:
                    out.append(0.5 + 0.5 * v)
            return out
        deficit = self._combined([max(0.0, -h) for h in ttft_h], [max(0.0, -h) for h in tpot_h],
                                 wt, wp)  # fmt: skip
        idle = [e.inflight_requests == 0 for e in endpoints]
        return [0.5 if i else 0.49 * (1.0 - d) for i, d in zip(idle, deficit, strict=True)]

    @staticmethod
    def _combined(a: list[float], b: list[float], wa: float, wb: float) -> list[float]:
        """Min-max normalize each dimension over the candidates and mix (a dimension without
        spread gets no weight)."""

        def norm(v: list[float]) -> tuple[list[float], bool]:
            lo, hi = min(v), max(v)
            if hi - lo <= 1e-12:
                return [0.0] * len(v), False
            return [(x - lo) / (hi - lo) for x in v], True

        na, sa = norm(a)
        nb, sb = norm(b)
        wa, wb = (wa if sa else 0.0), (wb if sb else 0.0)
        s = wa + wb
        if s == 0:
            return [0.0] * len(a)
        return [(wa * x + wb * y) / s for x, y in zip(na, nb, strict=True)]

    def _composite(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[float]:
        p = self.params
        wk, wq, wp = p.composite_kv_weight, p.composite_queue_weight, p.composite_prefix_weight
        total = (wk + wq + wp) or 1.0
        max_q = max((e.waiting for e in endpoints), default=0)
        best: dict[str, float] = {}
        for matches in request.prefix.values():
            for key, m in matches.items():
                if m.total_blocks:
                    best[key] = max(best.get(key, 0.0), m.match_blocks / m.total_blocks)
        out = []
        for e in endpoints:
            q = (max_q - e.waiting) / max_q if max_q else 1.0
            out.append((wk * (1 - e.kv_usage) + wq * q + wp * best.get(e.key, 0.0)) / total)
        return out


class LatencyAdmitterParams(PluginParams):
    cold_kv_threshold: float = Field(default=0.02, ge=0, le=1, alias="coldKVThreshold")


class LatencySLOAdmitter(Admitter[LatencyAdmitterParams]):
    """Sheddable requests (priority < 0) with an SLO are refused early (429) when no endpoint
    is predicted to meet it, none is idle and none is cold (KV below 2%); others pass."""

    type_name = "latency-slo-admitter"
    Params = LatencyAdmitterParams
    needs: ClassVar[tuple[str, ...]] = (PRODUCER,)

    def admit(self, request: LLMRequest, endpoints: list[EndpointState]) -> str | None:
        if request.priority >= 0 or not endpoints:
            return None
        st = latency_state(request)
        if st is None or not st.valid or (st.slo_ttft_s is None and st.slo_tpot_s is None):
            return None
        for e in endpoints:
            if e.inflight_requests == 0 or e.kv_usage < self.params.cold_kv_threshold:
                return None
            pred = st.predictions.get(e.key)
            if pred is None:
                return None
            ok_t = pred.ttft_headroom_s is None or pred.ttft_headroom_s >= 0
            ok_p = pred.tpot_headroom_s is None or pred.tpot_headroom_s >= 0
            if ok_t and ok_p:
                return None
        return "no endpoint is predicted to meet the request's SLO"


class AffinityParams(PluginParams):
    affinity_threshold: float = Field(default=0.80, ge=0, le=1, alias="affinityThreshold")
    exploration_probability: float = Field(default=0.0, ge=0, le=1, alias="explorationProbability")
    max_ttft_penalty_ms: float = Field(default=18_000, ge=0, alias="maxTTFTPenaltyMs")
    peak_prefill_throughput: float = Field(default=15_928, gt=0, alias="peakPrefillThroughput")
    ttft_source: Literal["estimate", "latencyPredictor"] = Field(
        default="estimate", alias="ttftSource"
    )
    prefix_match_info_producer_name: str | None = Field(
        default=None, alias="prefixMatchInfoProducerName"
    )


class PrefixCacheAffinityFilter(Filter[AffinityParams]):
    """Sticky until saturated (llm-d's current default): keep the endpoints whose prefix match
    is at least `affinityThreshold`, unless sticking costs more than `maxTTFTPenaltyMs` of TTFT
    over the best other endpoint (TTFT from in-flight prefill tokens / `peakPrefillThroughput`,
    or from the latency model). None match: all stay."""

    type_name = "prefix-cache-affinity-filter"
    Params = AffinityParams

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._rng = random.Random()
        named = self.params.prefix_match_info_producer_name
        self.needs: tuple[str, ...] = () if named else ("approx-prefix-cache-producer",)
        """Without a named producer, llm-d's approximate one (created when missing)."""

    def _ratios(self, request: LLMRequest) -> dict[str, float]:
        name = self.params.prefix_match_info_producer_name
        sources = (
            [request.prefix[name]]
            if name and name in request.prefix
            else list(request.prefix.values())
        )
        best: dict[str, float] = {}
        for matches in sources:
            for key, m in matches.items():
                if m.total_blocks:
                    best[key] = max(best.get(key, 0.0), m.match_blocks / m.total_blocks)
        return best

    def _ttft_ms(self, request: LLMRequest, e: EndpointState) -> float:
        p = self.params
        if p.ttft_source == "latencyPredictor":
            st = latency_state(request)
            pred = st.predictions.get(e.key) if st is not None and st.valid else None
            if pred is not None:
                return pred.ttft_s * 1000
        return e.inflight_tokens / p.peak_prefill_throughput * 1000

    def filter(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[EndpointState]:
        p = self.params
        if p.exploration_probability and self._rng.random() < p.exploration_probability:
            return endpoints
        ratios = self._ratios(request)
        sticky = [e for e in endpoints if ratios.get(e.key, 0.0) >= p.affinity_threshold]
        if not sticky or len(sticky) == len(endpoints):
            return endpoints
        if p.max_ttft_penalty_ms > 0:
            others = [e for e in endpoints if e not in sticky]
            best_sticky = min(self._ttft_ms(request, e) for e in sticky)
            best_other = min(self._ttft_ms(request, e) for e in others)
            if best_sticky - best_other > p.max_ttft_penalty_ms:
                return endpoints  # saturated: stop sticking
        return sticky


class TierParams(PluginParams):
    epsilon_explore_neg: float = Field(default=0.01, ge=0, le=1, alias="epsilonExploreNeg")


class SLOHeadroomTierFilter(Filter[TierParams]):
    """Endpoints predicted to meet the request's SLOs (both headrooms >= 0) are the positive
    tier, the rest (and those without a prediction) the negative one. With both tiers, the
    positive one, except `epsilonExploreNeg` of the time."""

    type_name = "slo-headroom-tier-filter"
    Params = TierParams

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._rng = random.Random()

    def filter(self, request: LLMRequest, endpoints: list[EndpointState]) -> list[EndpointState]:
        st = latency_state(request)
        if st is None or not st.valid:
            return endpoints
        positive: list[EndpointState] = []
        negative: list[EndpointState] = []
        for e in endpoints:
            pred = st.predictions.get(e.key)
            ok = pred is not None and (pred.ttft_headroom_s is None or pred.ttft_headroom_s >= 0)
            ok = (
                ok
                and pred is not None
                and (pred.tpot_headroom_s is None or pred.tpot_headroom_s >= 0)
            )
            (positive if ok else negative).append(e)
        if not positive or not negative:
            return endpoints
        if self._rng.random() < self.params.epsilon_explore_neg:
            return negative
        return positive


LATENCY_PLUGINS = (
    PredictedLatencyProducer,
    LatencyScorer,
    LatencySLOAdmitter,
    PrefixCacheAffinityFilter,
    SLOHeadroomTierFilter,
)
