"""Put this folder on PYTHONPATH to make svd-vllm look NOT installed to vLLM.

Every Python process (vLLM spawns several) runs ``sitecustomize`` at start-up; this one
filters svd-vllm's entry points out of ``importlib.metadata.entry_points``, so vLLM loads
neither the logits processor nor the adapter-identity hook. Used by the benchmarks for the
"plugin not installed" baseline without uninstalling anything.
"""

import importlib.metadata as _md

_original = _md.entry_points


def _entry_points(**params):  # type: ignore[no-untyped-def]
    eps = _original(**params)
    if params:
        return _md.EntryPoints(e for e in eps if not e.value.startswith("svd_vllm"))
    return eps


_md.entry_points = _entry_points
