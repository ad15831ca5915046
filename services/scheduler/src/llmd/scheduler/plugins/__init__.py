"""The built-in plugins, and the registry that maps llm-d's type strings to plugin classes.

Plugins outside this repository register through the Python entry-point group
`llmd.scheduler.plugins`: each entry point names a `Plugin` subclass (or a callable returning
several). `plugin_registry()` holds the built-ins plus every installed entry point; a broken or
clashing entry point is a ConfigError naming it, never a silent omission.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

from llmd.runtime.config import ConfigError, ConfigIssue
from llmd.scheduler.flowcontrol import FLOW_PLUGINS
from llmd.scheduler.framework import Plugin, PluginRegistry
from llmd.scheduler.plugins.dataparallel import DATA_PARALLEL_PLUGINS
from llmd.scheduler.plugins.disagg import DISAGG_PLUGINS
from llmd.scheduler.plugins.filters import FILTERS
from llmd.scheduler.plugins.latency import LATENCY_PLUGINS
from llmd.scheduler.plugins.pickers import PICKERS
from llmd.scheduler.plugins.precise import PreciseProducer
from llmd.scheduler.plugins.producers import PRODUCERS
from llmd.scheduler.plugins.scorers import SCORERS

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "llmd.scheduler.plugins"
DEPRECATED_ALIASES = {"token-producer": ("tokenizer",)}


def builtin_registry() -> PluginRegistry:
    """A fresh registry holding every built-in plugin type."""
    registry = PluginRegistry()
    for cls in (
        *FILTERS,
        *SCORERS,
        *PICKERS,
        *PRODUCERS,
        PreciseProducer,
        *FLOW_PLUGINS,
        *LATENCY_PLUGINS,
        *DISAGG_PLUGINS,
        *DATA_PARALLEL_PLUGINS,
    ):
        registry.add(cls, *DEPRECATED_ALIASES.get(cls.type_name, ()))
    return registry


def _classes(obj: object) -> list[type[Plugin[Any]]]:
    if isinstance(obj, type) and issubclass(obj, Plugin):
        return [obj]
    if callable(obj):
        got = obj()
        if isinstance(got, list | tuple) and all(
            isinstance(c, type) and issubclass(c, Plugin) for c in got
        ):
            return list(got)
    raise TypeError("is neither a Plugin subclass nor a callable returning Plugin subclasses")


def plugin_registry() -> PluginRegistry:
    """The built-in plugins plus those installed under the `llmd.scheduler.plugins` group."""
    registry = builtin_registry()
    issues: list[ConfigIssue] = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {ep.name} = {ep.value}"
        try:
            for cls in _classes(ep.load()):
                registry.add(cls)
                log.info("plugin type %r from %s", cls.type_name, where)
        except Exception as exc:  # an installed package's import can fail in any way
            issues.append(ConfigIssue(ENTRY_POINT_GROUP, f"{where}: {type(exc).__name__}: {exc}"))
    if issues:
        raise ConfigError(issues, "installed scheduler plugins")
    return registry
