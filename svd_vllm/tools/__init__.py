"""User-facing tools: the ``svd-vllm`` CLI, ``svd-vllm serve`` (vLLM + sidecar) and the demos."""
