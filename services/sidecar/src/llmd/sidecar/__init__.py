"""llmd-sidecar: prefill/decode disaggregation beside vLLM on decode pods."""
