"""Loaded by the vLLM servers that llmd's harness starts with a NixlConnector (this directory
is put on their PYTHONPATH): sets the poll delay of NIXL's progress thread.

NIXL's Python agent (`nixl_agent`, 1.5.1) creates every agent with a progress-thread delay of 0,
so the UCX backend's progress thread calls poll() with a zero timeout in a loop and keeps a core
busy whether or not anything is moving. With a delay, the thread blocks in poll() on the UCX
worker's event descriptor until traffic arrives or the delay passes. On this project's 2-core
machines two spinning engines starved every other process (a third vLLM server could not finish
starting; the decode leg of a P/D request waited seconds for its KV). Production pods with cores
to spare pay one busy core per engine instead.

`LLMD_NIXL_PROGRESS_DELAY_US` (microseconds, NIXL's unit) turns it on; unset, nothing changes.
The agent's constructor is wrapped when NIXL's bindings module is first imported, so vLLM and
NIXL are used unmodified.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

DELAY_ENV = "LLMD_NIXL_PROGRESS_DELAY_US"


def _wrap_agent(module: ModuleType, delay_us: int) -> None:
    real: Callable[..., Any] = getattr(module, "nixlAgent")  # noqa: B009 (a C extension's)

    def nixl_agent(name: str, config: Any) -> Any:
        config.pthrDelay = delay_us
        return real(name, config)

    setattr(module, "nixlAgent", nixl_agent)  # noqa: B010


class _NixlBindingsHook(importlib.abc.MetaPathFinder):
    """Finds `nixl_cu*._bindings` through the other finders, then wraps its agent."""

    def __init__(self, delay_us: int) -> None:
        self.delay_us = delay_us

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if not (fullname.startswith("nixl_cu") and fullname.endswith("._bindings")):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
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
        delay_us = self.delay_us

        def exec_and_wrap(module: ModuleType) -> None:
            exec_module(module)
            _wrap_agent(module, delay_us)

        loader.exec_module = exec_and_wrap  # type: ignore[method-assign]
        return spec


def _install() -> None:
    raw = os.environ.get(DELAY_ENV, "")
    if not raw:
        return
    try:
        delay_us = int(raw)
    except ValueError:
        print(f"{DELAY_ENV}={raw!r} is not a whole number of microseconds", file=sys.stderr)
        return
    sys.meta_path.insert(0, _NixlBindingsHook(delay_us))


_install()
