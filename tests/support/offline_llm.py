"""Run a list of requests through vLLM's offline ``LLM`` (with the installed plugin).

Usage: python offline_llm.py SPEC.json OUT.json. SPEC: {"model", "loras": {name: path},
"max_tokens", "requests": [{"prompt", "lora": name|null, "extra_args": {...}}],
"modes": ["batch", "alone"]}. OUT: {"batch": [[ids...]...], "alone": [[ids...]...]}.
Run as a subprocess so the engine processes live and die with it.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=spec["model"],
        enable_lora=True,
        max_lora_rank=8,
        max_loras=4,
        enforce_eager=True,
        max_model_len=512,
        dtype="float32",
        max_num_seqs=16,
    )
    ids = {name: i + 1 for i, name in enumerate(sorted(spec["loras"]))}

    def lora(name: str | None) -> LoRARequest | None:
        return None if name is None else LoRARequest(name, ids[name], spec["loras"][name])

    reqs = spec["requests"]
    params = [
        SamplingParams(temperature=0, max_tokens=spec["max_tokens"], extra_args=r.get("extra_args"))
        for r in reqs
    ]
    out: dict[str, list[list[int]]] = {}
    if "batch" in spec["modes"]:
        res = llm.generate(
            [r["prompt"] for r in reqs], params, lora_request=[lora(r.get("lora")) for r in reqs]
        )
        out["batch"] = [list(o.outputs[0].token_ids) for o in res]
    if "alone" in spec["modes"]:
        out["alone"] = [
            list(
                llm.generate([r["prompt"]], p, lora_request=lora(r.get("lora")))[0]
                .outputs[0]
                .token_ids
            )
            for r, p in zip(reqs, params, strict=True)
        ]
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
