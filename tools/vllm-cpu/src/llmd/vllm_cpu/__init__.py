"""Real vLLM 0.32 CPU for llmd tests."""
