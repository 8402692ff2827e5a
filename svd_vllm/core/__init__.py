"""The shared core: SVD maths, the steering-artifact file format, model and tokenizer identity.

Imported by every process (vLLM engines, the sidecar, offline tools). `steering` needs torch;
`artifact`, `identity` and `validation` do not (the sidecar runs without torch).
"""

#: The maths ``svd_vllm`` exports as its stable API (from ``steering``), listed here, torch-free,
#: so the package can offer the names lazily without importing torch.
MATH_API: tuple[str, ...] = (
    "aggregate_mu",
    "confidence_mask",
    "exact_delta",
    "gauss_newton_mu",
    "gauss_newton_terms",
    "log_ratio",
    "pooled_mu",
    "precomputed_delta",
    "steer",
    "svd_logits",
)
