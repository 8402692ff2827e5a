"""One vLLM engine, decode throughput at a fixed batch, for benchmarks/processor.py.

Usage: python decode_run.py SPEC.json OUT.json. SPEC: {"model", "lora"?, "batch",
"max_tokens", "configs": ["idle", "steered", ...], "rounds"}. Each round runs every config
once (interleaved); "plain" requests carry no steering args, "idle" ones carry svd=0,
"steered" ones svd=1 (vector = the LoRA's). Prints nothing but writes tokens/s per run.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    kw = {}
    if spec.get("lora"):
        kw = {"enable_lora": True, "max_lora_rank": 8, "max_loras": 1}
    llm = LLM(
        model=spec["model"],
        max_model_len=1024,
        max_num_seqs=spec["batch"],
        dtype=spec.get("dtype", "bfloat16"),
        enable_prefix_caching=True,
        **kw,
    )
    lora = LoRARequest("bench", 1, spec["lora"]) if spec.get("lora") else None
    prompts = [
        f"Question {i}: describe the history of the number {i} in detail.\nAnswer:"
        for i in range(spec["batch"])
    ]
    args = {"plain": None, "idle": {"svd": 0}, "steered": {"svd": 1}}
    # Warm-up.
    llm.generate(
        prompts, SamplingParams(max_tokens=16, ignore_eos=True), lora_request=lora, use_tqdm=False
    )
    runs = []
    for r in range(spec["rounds"]):
        for cfg in spec["configs"]:
            sp = SamplingParams(
                temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True, extra_args=args[cfg]
            )
            t0 = time.perf_counter()
            out = llm.generate(prompts, sp, lora_request=lora, use_tqdm=False)
            dt = time.perf_counter() - t0
            n = sum(len(o.outputs[0].token_ids) for o in out)
            runs.append({"config": cfg, "round": r, "tokens": n, "seconds": dt, "tok_s": n / dt})
    with open(sys.argv[2], "w") as f:
        json.dump(runs, f)


if __name__ == "__main__":
    main()
