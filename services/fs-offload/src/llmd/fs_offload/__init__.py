"""llmd-fs-offload: a shared-filesystem KV tier for vLLM that never serves wrong KV; its evictor."""

__version__ = "0.1.0"
