"""Seeded, deterministic request traces.

A trace is a list of `TraceRequest`s: when to send (seconds from the start, for open-loop
runs), what to send (a completion prompt or chat messages), how many tokens to generate, and
the stage and session it belongs to. The same spec and seed give the same trace, byte for byte
(`trace_digest`), so every target in a side-by-side run sees the same requests.

Workloads:
- `shared_prefix`: llm-d's shared-prefix synthetic (inference-perf `shared_prefix`): groups x
  prompts per group, a system prompt per group, a question per prompt, fixed output length;
  constant-rate stages or a Poisson QPS sweep.
- `multi_turn`: chat sessions; each turn repeats the conversation so far plus a new user turn.
- `random`: no sharing at all, random prompts of a given length.
- `agentic`: very long shared contexts (a tool-using agent re-reading its history), few users.
- `replay`: a JSONL file, one request per line (`{"t": .., "prompt"|"messages": .., "max_tokens"}`).

Lengths are in words of a fixed synthetic vocabulary ("w123"), which tokenizers split into a
stable number of tokens; reports record the engines' own token counts.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

VOCAB = [f"w{i}" for i in range(8192)]


@dataclass(frozen=True, slots=True)
class Stage:
    """A load stage: `rate` requests/s for `duration_s` (open loop), or `concurrency` users."""

    rate: float | None = None
    duration_s: float = 60.0
    concurrency: int | None = None
    arrival: Literal["poisson", "constant"] = "poisson"

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("a stage has either a rate (open loop) or a concurrency")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"stage rate must be positive, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"stage concurrency must be >= 1, got {self.concurrency}")
        if self.duration_s <= 0:
            raise ValueError(f"stage duration must be positive, got {self.duration_s}")


@dataclass(slots=True)
class TraceRequest:
    t: float
    """Send time in seconds from the start of the run (open loop); order for closed loop."""
    max_tokens: int
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    stage: int = 0
    group: int | None = None
    session: str | None = None

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.messages is not None else "/v1/completions"

    def body(self, model: str, stream: bool = True) -> dict[str, Any]:
        doc: dict[str, Any] = {"model": model, "max_tokens": self.max_tokens, "stream": stream}
        if stream:
            doc["stream_options"] = {"include_usage": True}
        doc["ignore_eos"] = True
        if self.messages is not None:
            doc["messages"] = self.messages
        else:
            doc["prompt"] = self.prompt
        return doc


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(VOCAB, k=max(1, n)))


def _arrivals(rng: random.Random, stages: Sequence[Stage]) -> list[tuple[float, int]]:
    """(time, stage index) for every open-loop request of `stages`, back to back."""
    out: list[tuple[float, int]] = []
    start = 0.0
    for i, st in enumerate(stages):
        if st.rate is None:
            raise ValueError("closed-loop stages have no arrival times; use requests_per_stage")
        t = start
        while True:
            t += rng.expovariate(st.rate) if st.arrival == "poisson" else 1.0 / st.rate
            if t >= start + st.duration_s:
                break
            out.append((t, i))
        start += st.duration_s
    return out


@dataclass(frozen=True, slots=True)
class SharedPrefix:
    """llm-d's shared-prefix synthetic data (lengths in words)."""

    num_groups: int = 32
    num_prompts_per_group: int = 32
    system_prompt_len: int = 2048
    question_len: int = 256
    output_len: int = 256


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    kind: Literal["shared_prefix", "multi_turn", "random", "agentic", "replay"]
    stages: tuple[Stage, ...] = (Stage(rate=1.0, duration_s=60.0),)
    seed: int = 42
    shared_prefix: SharedPrefix = field(default_factory=SharedPrefix)
    input_len: int = 512
    output_len: int = 128
    turns: int = 5
    sessions: int = 16
    context_len: int = 20_000
    replay_file: str | None = None
    requests_per_stage: int = 100
    """Closed-loop stages: how many requests each stage sends."""


def build_trace(spec: WorkloadSpec) -> list[TraceRequest]:
    """The spec's trace; deterministic for a given spec (seed included)."""
    rng = random.Random(spec.seed)
    if spec.kind == "replay":
        if not spec.replay_file:
            raise ValueError("the replay workload needs replay_file")
        return load_jsonl(spec.replay_file)
    slots = _slots(rng, spec)
    if spec.kind == "shared_prefix":
        return _shared_prefix(rng, spec, slots)
    if spec.kind == "random":
        return [
            TraceRequest(t, spec.output_len, prompt=_words(rng, spec.input_len), stage=s)
            for t, s in slots
        ]
    if spec.kind == "multi_turn":
        return _multi_turn(rng, spec, slots, spec.input_len)
    if spec.kind == "agentic":
        return _agentic(rng, spec, slots)
    raise ValueError(f"unknown workload kind {spec.kind!r}")


def _slots(rng: random.Random, spec: WorkloadSpec) -> list[tuple[float, int]]:
    if all(s.rate is not None for s in spec.stages):
        return _arrivals(rng, spec.stages)
    if all(s.concurrency is not None for s in spec.stages):
        return [
            (float(k), i) for i, _ in enumerate(spec.stages) for k in range(spec.requests_per_stage)
        ]
    raise ValueError("mixing open-loop (rate) and closed-loop (concurrency) stages")


def _shared_prefix(
    rng: random.Random, spec: WorkloadSpec, slots: list[tuple[float, int]]
) -> list[TraceRequest]:
    sp = spec.shared_prefix
    systems = [_words(rng, sp.system_prompt_len) for _ in range(sp.num_groups)]
    questions = [
        [_words(rng, sp.question_len) for _ in range(sp.num_prompts_per_group)]
        for _ in range(sp.num_groups)
    ]
    out = []
    for t, stage in slots:
        g = rng.randrange(sp.num_groups)
        q = questions[g][rng.randrange(sp.num_prompts_per_group)]
        out.append(
            TraceRequest(t, sp.output_len, prompt=f"{systems[g]}\n{q}", stage=stage, group=g)
        )
    return out


def _multi_turn(
    rng: random.Random, spec: WorkloadSpec, slots: list[tuple[float, int]], user_len: int
) -> list[TraceRequest]:
    """Each slot is the next turn of a random unfinished session (a finished one restarts)."""
    history: dict[int, list[dict[str, str]]] = {}
    out = []
    for t, stage in slots:
        sid = rng.randrange(spec.sessions)
        msgs = history.get(sid)
        if msgs is None or len(msgs) >= 2 * spec.turns:
            msgs = [{"role": "system", "content": _words(rng, 64)}]
        msgs = [*msgs, {"role": "user", "content": _words(rng, user_len)}]
        out.append(
            TraceRequest(
                t, spec.output_len, messages=msgs, stage=stage, session=f"s{sid}", group=sid
            )
        )
        # the assistant's reply is not known in advance: a fixed stand-in keeps the prefix stable
        history[sid] = [*msgs, {"role": "assistant", "content": _words(rng, spec.output_len)}]
    return out


def _agentic(
    rng: random.Random, spec: WorkloadSpec, slots: list[tuple[float, int]]
) -> list[TraceRequest]:
    contexts = [_words(rng, spec.context_len) for _ in range(spec.sessions)]
    steps: dict[int, list[str]] = {}
    out = []
    for t, stage in slots:
        sid = rng.randrange(spec.sessions)
        trail = steps.setdefault(sid, [])
        trail.append(_words(rng, spec.input_len))
        prompt = contexts[sid] + "\n" + "\n".join(trail)
        out.append(
            TraceRequest(
                t, spec.output_len, prompt=prompt, stage=stage, session=f"a{sid}", group=sid
            )
        )
    return out


def load_jsonl(path: str | Path) -> list[TraceRequest]:
    """A trace file: one JSON object per line with `t`, `prompt` or `messages`, `max_tokens`
    (optional `stage`, `session`, `group`). Every bad line is reported with its number."""
    out: list[TraceRequest] = []
    problems: list[str] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            if ("prompt" in doc) == ("messages" in doc):
                raise ValueError("give exactly one of 'prompt' and 'messages'")
            out.append(
                TraceRequest(
                    t=float(doc.get("t", 0.0)),
                    max_tokens=int(doc.get("max_tokens", 128)),
                    prompt=doc.get("prompt"),
                    messages=doc.get("messages"),
                    stage=int(doc.get("stage", 0)),
                    session=doc.get("session"),
                    group=doc.get("group"),
                )
            )
        except (ValueError, TypeError) as exc:
            problems.append(f"{path}:{n}: {exc}")
    if problems:
        raise ValueError("bad trace file:\n" + "\n".join(problems[:20]))
    return sorted(out, key=lambda r: r.t)


def dump_jsonl(trace: Iterable[TraceRequest], path: str | Path) -> None:
    with Path(path).open("w") as f:
        for r in trace:
            doc = {k: v for k, v in asdict(r).items() if v is not None}
            f.write(json.dumps(doc, sort_keys=True) + "\n")


def trace_digest(trace: Iterable[TraceRequest]) -> str:
    """A short fingerprint of a trace (reports record it: same digest, same requests)."""
    h = hashlib.sha256()
    for r in trace:
        h.update(json.dumps(asdict(r), sort_keys=True).encode())
    return h.hexdigest()[:16]
