"""Loaded by the vLLM servers that llmd's harness starts (this directory is put on their
PYTHONPATH): two settings that vLLM and NIXL hard-code for machines with cores to spare, made
to fit this project's 2-core machines. Each is off unless its variable is set, and each wraps a
module when it is first imported, so vLLM and NIXL run unmodified.

`LLMD_VLLM_SHM_SPIN_S` (seconds): how long a reader of vLLM's shared-memory message queue keeps
spinning after a read before it sleeps on the queue's notify socket. vLLM 0.32 spins for 1 s
(`SpinCondition.busy_loop_s`, calling sched_yield in a loop). The engine core and its worker
process each read such a queue, so after every engine step both spin for up to a second. On 2
cores that starves the processes which would feed them: the API server with the next request,
the other engine, the router. A P/D prefill engine waiting for its blocks to be pulled steps
without running the model, so its prefill legs took up to ~1 s instead of ~50 ms.

`LLMD_VLLM_SHM_RECHECK_MS` (milliseconds): how long such a reader, once asleep, waits for a
notify before it looks at the queue again anyway. A notify can be lost (vLLM publishes them on a
ZMQ PUB socket with a send high-water mark of 1), and vLLM then finds the message after its
5 s recheck. With readers that spin 1 s, that almost never matters; with short spins the
readers sleep between steps and about one P/D request in twelve stalled for 5 s mid-stream.

`LLMD_NIXL_PROGRESS_DELAY_US` (microseconds, NIXL's unit): the poll delay of NIXL's progress
thread. NIXL's Python agent (`nixl_agent`, 1.5.1) creates every agent with a delay of 0, so the
UCX backend's progress thread calls poll() with a zero timeout in a loop and keeps a core busy
whether or not anything is moving. With a delay, the thread blocks in poll() on the UCX worker's
event descriptor until traffic arrives or the delay passes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import math
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

SHM_SPIN_ENV = "LLMD_VLLM_SHM_SPIN_S"
SHM_RECHECK_ENV = "LLMD_VLLM_SHM_RECHECK_MS"
NIXL_DELAY_ENV = "LLMD_NIXL_PROGRESS_DELAY_US"
SHM_MODULE = "vllm.distributed.device_communicators.shm_broadcast"


def _warn(message: str) -> None:
    print(f"llmd engine_site: {message}", file=sys.stderr)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds the modules `matches` accepts through the other finders, then calls `patch` on
    each once it has run."""

    def __init__(self, matches: Callable[[str], bool], patch: Callable[[ModuleType], None]):
        self.matches = matches
        self.patch = patch

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if not self.matches(fullname):
            return None
        for finder in sys.meta_path:
            if isinstance(finder, _AfterImport) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module
        patch = self.patch

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            patch(module)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def shm_spin_patch(spin_s: float) -> Callable[[ModuleType], None]:
    def patch(module: ModuleType) -> None:
        cls = getattr(module, "SpinCondition", None)
        init = getattr(cls, "__init__", None)
        if cls is None or init is None:
            _warn(f"{SHM_MODULE} has no SpinCondition: {SHM_SPIN_ENV} has no effect")
            return

        def spin_condition_init(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            if getattr(self, "is_reader", False):
                self.busy_loop_s = spin_s

        cls.__init__ = spin_condition_init

    return patch


def shm_recheck_patch(recheck_ms: int) -> Callable[[ModuleType], None]:
    def patch(module: ModuleType) -> None:
        if not hasattr(module, "SHM_READER_RECHECK_INTERVAL_MS"):
            _warn(f"{SHM_MODULE} has no reader recheck interval: {SHM_RECHECK_ENV} has no effect")
            return
        setattr(module, "SHM_READER_RECHECK_INTERVAL_MS", recheck_ms)  # noqa: B010

    return patch


def nixl_delay_patch(delay_us: int) -> Callable[[ModuleType], None]:
    def patch(module: ModuleType) -> None:
        real: Callable[..., Any] = getattr(module, "nixlAgent")  # noqa: B009 (a C extension's)

        def nixl_agent(name: str, config: Any) -> Any:
            config.pthrDelay = delay_us
            return real(name, config)

        setattr(module, "nixlAgent", nixl_agent)  # noqa: B010

    return patch


def _is_nixl_bindings(fullname: str) -> bool:
    return fullname.startswith("nixl_cu") and fullname.endswith("._bindings")


def _setting(name: str, convert: Callable[[str], float], low: float, expect: str) -> float | None:
    """The variable `name` converted and at least `low`; None when unset, or when it is not
    `expect` (said on stderr)."""
    raw = os.environ.get(name, "")
    if not raw:
        return None
    try:
        value = convert(raw)
    except ValueError:
        value = math.nan
    if not value >= low:
        _warn(f"{name}={raw!r} is not {expect}; the setting stays as shipped")
        return None
    return value


def _install() -> None:
    shm_patches: list[Callable[[ModuleType], None]] = []
    spin_s = _setting(SHM_SPIN_ENV, float, 0, "a number of seconds >= 0")
    if spin_s is not None:
        shm_patches.append(shm_spin_patch(spin_s))
    recheck_ms = _setting(SHM_RECHECK_ENV, int, 1, "a whole number of milliseconds >= 1")
    if recheck_ms is not None:
        shm_patches.append(shm_recheck_patch(int(recheck_ms)))
    if shm_patches:

        def patch_shm(module: ModuleType) -> None:
            for patch in shm_patches:
                patch(module)

        sys.meta_path.insert(0, _AfterImport(SHM_MODULE.__eq__, patch_shm))
    delay_us = _setting(NIXL_DELAY_ENV, int, 0, "a whole number of microseconds >= 0")
    if delay_us is not None:
        sys.meta_path.insert(0, _AfterImport(_is_nixl_bindings, nixl_delay_patch(int(delay_us))))


_install()
