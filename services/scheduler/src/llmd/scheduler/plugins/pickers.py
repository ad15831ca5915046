"""Built-in pickers and the single-profile handler."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from llmd.scheduler.framework import (
    EndpointState,
    LLMRequest,
    NoParams,
    Picker,
    PluginHandle,
    PluginParams,
    ProfileHandler,
    ProfileResult,
    SchedulingError,
    SchedulingResult,
    ScoredEndpoint,
)


class PickerParams(PluginParams):
    max_num_of_endpoints: int = Field(default=1, ge=1, le=32, alias="maxNumOfEndpoints")


class MaxScoreParams(PickerParams):
    tie_break: Literal["least-loaded", "random"] = Field(default="least-loaded", alias="tieBreak")
    """`random` is llm-d's behaviour (shuffle, then stable sort)."""


class MaxScorePicker(Picker[MaxScoreParams]):
    """Highest total score first. Ties go to the endpoint with the least outstanding work
    (in flight plus sent since its last scrape), then at random, so a burst that sees equal
    scores does not pile onto one endpoint."""

    type_name = "max-score-picker"
    Params = MaxScoreParams

    def __init__(self, name: str, params: MaxScoreParams, handle: PluginHandle) -> None:
        super().__init__(name, params, handle)
        self._rng = random.Random()

    def pick(self, request: LLMRequest, scored: list[ScoredEndpoint]) -> list[EndpointState]:
        k = self.params.max_num_of_endpoints
        rnd = self._rng.random
        if self.params.tie_break == "random":
            ranked = sorted(scored, key=lambda s: (-round(s.score, 9), rnd()))
            return [s.endpoint for s in ranked[:k]]
        if k == 1:
            best = max(
                scored,
                key=lambda s: (
                    round(s.score, 9),
                    -(s.endpoint.inflight_requests + len(s.endpoint.unseen)),
                    rnd(),
                ),
            )
            return [best.endpoint]
        ranked = sorted(
            scored,
            key=lambda s: (
                -round(s.score, 9),
                s.endpoint.inflight_requests + len(s.endpoint.unseen),
                rnd(),
            ),
        )
        return [s.endpoint for s in ranked[:k]]


class RandomPicker(Picker[PickerParams]):
    """Uniformly random endpoints."""

    type_name = "random-picker"
    Params = PickerParams

    def pick(self, request: LLMRequest, scored: list[ScoredEndpoint]) -> list[EndpointState]:
        k = min(self.params.max_num_of_endpoints, len(scored))
        return [s.endpoint for s in random.sample(scored, k)]


class WeightedRandomPicker(Picker[PickerParams]):
    """Random in proportion to score (A-Res sampling without replacement)."""

    type_name = "weighted-random-picker"
    Params = PickerParams

    def pick(self, request: LLMRequest, scored: list[ScoredEndpoint]) -> list[EndpointState]:
        k = self.params.max_num_of_endpoints
        if all(s.score <= 0 for s in scored):
            return [s.endpoint for s in random.sample(scored, min(k, len(scored)))]

        def key(s: ScoredEndpoint) -> float:
            if s.score <= 0:
                return 0.0
            u = random.random() or 1e-10
            return math.exp(math.log(u) / s.score)

        ranked = sorted(scored, key=key, reverse=True)
        return [s.endpoint for s in ranked[:k]]


class SingleProfileHandler(ProfileHandler[NoParams]):
    """Runs the one profile once; its picks are the destination."""

    type_name = "single-profile-handler"

    def pick_profiles(
        self, request: LLMRequest, profiles: Sequence[str], results: dict[str, ProfileResult | None]
    ) -> list[str]:
        return [] if results else list(profiles[:1])

    def process_results(
        self, request: LLMRequest, results: dict[str, ProfileResult | None]
    ) -> SchedulingResult:
        return single_result(results)


def single_result(results: dict[str, ProfileResult | None], port: int = 0) -> SchedulingResult:
    """The one profile's picks as the result (503 when it picked none), reached on `port`
    (0: each pick's own)."""
    name, result = next(iter(results.items()))
    if result is None or not result.targets:
        raise SchedulingError(503, "no endpoint could be picked", "rejected-no-endpoints")
    return SchedulingResult({name: result}, name, port=port)


PICKERS = (MaxScorePicker, RandomPicker, WeightedRandomPicker, SingleProfileHandler)
