"""Flow control: priority bands, fairness between tenants, bounded queues, saturation-gated
dispatch, and shedding, with llm-d's names, parameters, outcomes and metrics.

A request's flow is `(fairness id, priority)`: the fairness id from llm-d's fairness header,
the priority from its InferenceObjective (`objectives.py`; none = 0, negative = sheddable).
Each priority has a band; bands are served strictly highest first, flows within a band by the
band's fairness policy, items within a flow by its ordering policy.

    admit(request)
      -> nothing queued and the pool below the band's ceiling: dispatched at once (the common,
         unloaded case costs one saturation reading)
      -> else queued (global and band capacity in requests and bytes; over it: 429
         rejected-saturated) until the dispatcher lets it go, its TTL ends (429
         rejected-ttl-expired, or 503 rejected-no-endpoints while the pool is empty), or the
         client goes away (its entry is removed: nothing leaks)

The dispatcher runs whenever a request is queued or finishes, and every `tick` while anything
waits. One cycle reads the pool's saturation from the detector, asks the usage-limit policy for
each band's ceiling, and lets one request of the highest open band go; a band at or above its
ceiling blocks every lower band (llm-d's head-of-line rule, which protects high priorities).

**Stale metrics never halt the pool** (llm-d's most reported flow-control failure: its
utilization detector scores an endpoint with stale metrics as saturated, so a scrape outage
stops all dispatch). Here an endpoint whose metrics are stale or missing is judged by the
scheduler's own in-flight accounting instead: its queue is estimated as the requests in flight
beyond the largest batch it was ever seen running. `llm_d_epp_flow_control_stale_endpoints`
counts those endpoints and the change is logged. `stalenessPolicy: saturated` restores llm-d's
behaviour; `ignore` uses the last values.

**Bursts between scrapes.** `utilization-detector` adds to an endpoint's scraped queue the
requests sent since that scrape beyond the batch slots the endpoint had free (the most requests
it was seen holding with an empty queue, minus its batch at the scrape; none while it was
queueing). A burst is held back before the next scrape shows it, and an idle pool is not capped
at `queueDepthThreshold` requests per endpoint per scrape interval: each scrape that finds no
queue raises what an endpoint is known to hold.

The package: `spec.py` (the `flowControl:` keys), `policies.py` (detectors, usage limits,
fairness, ordering and eviction plugins, each under llm-d's type name) and `controller.py`
(`FlowController`, which admits, queues and dispatches, and `FlowMetrics`).
"""

from llmd.scheduler.flowcontrol.controller import FlowController, FlowMetrics
from llmd.scheduler.flowcontrol.policies import (
    FLOW_PLUGINS,
    EvictionFilter,
    EvictionOrder,
    FairnessPolicy,
    FlowKey,
    OrderingPolicy,
    SaturationDetector,
    UsageLimitPolicy,
    UtilizationDetector,
)
from llmd.scheduler.flowcontrol.spec import FlowControlSpec, parse_quantity

__all__ = [
    "FLOW_PLUGINS",
    "EvictionFilter",
    "EvictionOrder",
    "FairnessPolicy",
    "FlowControlSpec",
    "FlowController",
    "FlowKey",
    "FlowMetrics",
    "OrderingPolicy",
    "SaturationDetector",
    "UsageLimitPolicy",
    "UtilizationDetector",
    "parse_quantity",
]
