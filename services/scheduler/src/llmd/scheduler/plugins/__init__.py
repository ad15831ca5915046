"""The built-in plugins and the registry that maps llm-d's type strings to them."""

from __future__ import annotations

from llmd.scheduler.framework import PluginRegistry
from llmd.scheduler.plugins.filters import FILTERS
from llmd.scheduler.plugins.pickers import PICKERS
from llmd.scheduler.plugins.precise import PreciseProducer
from llmd.scheduler.plugins.producers import PRODUCERS
from llmd.scheduler.plugins.scorers import SCORERS

DEPRECATED_ALIASES = {"token-producer": ("tokenizer",)}


def builtin_registry() -> PluginRegistry:
    """A fresh registry holding every built-in plugin type."""
    registry = PluginRegistry()
    for cls in (*FILTERS, *SCORERS, *PICKERS, *PRODUCERS, PreciseProducer):
        registry.add(cls, *DEPRECATED_ALIASES.get(cls.type_name, ()))
    return registry
